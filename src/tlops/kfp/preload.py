"""Imported by the kfp-local runner's forkserver (:mod:`tlops.kfp.local_fork`) before it forks any
task, and nowhere else: the libraries and tlops modules the steps import, so that a task starts
with them loaded instead of importing them again (seconds per task on 2 cores). A module missing
here only costs time: the task imports it itself. ``gc.freeze`` last: the forked tasks' collections
then skip these objects instead of walking (and copying) them."""

import gc
import importlib
import warnings

from tlops.steps import STEP_MODULES  # the six steps' modules, from their one registry

MODULES = (
    "kfp.dsl.executor_main",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "sklearn.metrics",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "tlops.kfp.task",
    "tlops.runners.local",
    *STEP_MODULES.values(),
    "tlops.models.bundle",
    "tlops.features.extract",
    "tlops.training.strategies",
    "tlops.evaluation.metrics",
    "tlops.tracking.registry",
    "tlops.tracking.pyfunc",
    "tlops.monitoring.reference",
    "tlops.serving.package",
)

# What importing warns about is recorded, not printed (this process's stderr is the terminal's). Not a
# filter: a library may set its own filters inside its calls (MLflow does), which win over ours.
with warnings.catch_warnings(record=True):
    for _name in MODULES:
        try:
            importlib.import_module(_name)
        except ImportError:  # an optional extra not installed: the task that needs it says so itself
            pass
    import matplotlib

    matplotlib.use("Agg")  # the backend tlops's plots select (files, no display) before they import pyplot
    import matplotlib.pyplot  # noqa: F401
gc.freeze()
