"""The six pipeline steps. Each module has ``run(config, inputs, out) -> Artifact``."""

from importlib import import_module

STEP_MODULES = {
    "ingest": "tlops.steps.ingest",
    "pull-model": "tlops.steps.pull_model",
    "extract-features": "tlops.steps.extract_features",
    "fine-tune": "tlops.steps.fine_tune",
    "evaluate": "tlops.steps.evaluate",
    "register": "tlops.steps.register",
}


def get_step(name: str):
    if name not in STEP_MODULES:
        raise KeyError(name)
    return import_module(STEP_MODULES[name])
