"""The MLflow pyfunc wrapper: raw inputs in, labels and probabilities out, by the model's contract.

What a request may hold and what comes back is :mod:`tlops.serving.contract` (images as PNG/JPEG
bytes, base64 or pixel arrays of any size and dtype; text from the ``text`` column or the only
string column; table formats for both). A request that breaks the contract raises an
``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``)
that says what was expected. Python callers of the unwrapped model
(``.unwrap_python_model().predict(None, paths)``) may also pass image file paths.

Every output row names the model that answered (``model_name``, ``model_version``,
``model_alias``): from ``model_config`` when the loader knows it (``tlops serve``,
:func:`tlops.serving.registry.load`), else looked up in the registry by the model's run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from tlops.errors import ModelError
from tlops.serving.contract import Contract, ContractError

log = logging.getLogger(__name__)


class TlopsClassifier(mlflow.pyfunc.PythonModel):
    # predict() takes whatever the input contract parses (tables, arrays, lists, dicts), which no
    # MLflow type hint describes: MLflow's hint-based validation is skipped (the attribute its own
    # ChatModel subclasses use), and with it the "Add type hints" warning it printed on every
    # import; the contract validates inputs and the output signature is logged explicitly
    _skip_type_hint_validation = True

    @classmethod
    def from_model_dir(cls, model_dir: Path, identity: dict[str, Any]) -> "TlopsClassifier":
        """The model in a downloaded model directory, loaded by the tlops package's own code.

        What tlops' loaders use (:func:`tlops.serving.registry.load`): nothing from the directory
        is executed (``mlflow.pyfunc.load_model`` would run the stored ``pyfunc_model.py``); the
        MLmodel file is read as plain YAML for the artifact paths, weights load with safetensors.
        """
        import yaml

        from tlops.models.bundle import load_classifier

        model_dir = Path(model_dir)
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
        paths = {k: (model_dir / v["path"]).resolve() for k, v in (flavor.get("artifacts") or {}).items()}
        outside = [k for k, p in paths.items() if not p.is_relative_to(model_dir.resolve())]
        if outside:
            raise ModelError(f"{model_dir}/MLmodel: artifacts {outside} point outside the model directory")
        if "bundle" not in paths:
            raise ModelError(f"{model_dir}/MLmodel names no 'bundle' artifact: not a model registered by tlops")
        self = cls()
        self.clf = load_classifier(paths["bundle"])
        path = paths.get("contract")
        self.contract = Contract.load(path) if path else Contract.from_bundle(paths["bundle"])
        self.identity = dict(identity)
        return self

    def load_context(self, context: Any) -> None:
        from tlops.models.bundle import load_classifier

        bundle = context.artifacts["bundle"]
        self.clf = load_classifier(bundle)
        path = context.artifacts.get("contract")
        self.contract = Contract.load(path) if path else Contract.from_bundle(bundle)
        cfg = dict(getattr(context, "model_config", None) or {})
        self.identity = {
            "model_name": cfg.get("name") or self.contract.model_name,
            "model_version": cfg.get("version"),
            "model_alias": cfg.get("alias"),
        }
        if self.identity["model_version"] is None:
            self.identity.update(_registered_identity(Path(bundle).parents[1], self.identity["model_name"]))

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:  # context is None only for direct Python calls of the unwrapped model: file paths allowed
            items = self.contract.parse(model_input, allow_paths=context is None)
        except ContractError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return self.contract.frame(self.contract.predict_proba(self.clf, items), self.identity)


def _registered_identity(model_dir: Path, name: str | None) -> dict[str, Any]:
    """The registered version (and its aliases) holding this model, when a registry is configured."""
    import os

    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:  # pragma: no cover - older/newer MLflow layouts

        def is_tracking_uri_set() -> bool:
            return bool(os.environ.get("MLFLOW_TRACKING_URI"))

    if not name or not is_tracking_uri_set() or not (model_dir / "MLmodel").is_file():
        return {}
    try:
        import yaml
        from mlflow import MlflowClient

        run_id = yaml.safe_load((model_dir / "MLmodel").read_text()).get("run_id")
        c = MlflowClient()
        found = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        mv = c.get_model_version(name, found[0].version) if len(found) == 1 else None  # search omits aliases
    except Exception as e:  # the registry is a nicety here: predictions work without it
        log.debug("cannot look up the registered version of %s: %s", model_dir, e)
        return {}
    if mv is None:
        return {}
    return {"model_version": str(mv.version), "model_alias": ",".join(sorted(mv.aliases)) or None}


def predict_frame(clf: Any, x: Any, identity: dict[str, Any] | None = None) -> Any:
    """The output table for raw inputs ``x`` scored by ``clf`` (used to log the output signature)."""
    from tlops.serving.contract import build_contract

    spec = {"preprocessing": {"modality": clf.backbone.modality}, "classes": clf.classes}
    contract = Contract(build_contract(spec, model_name=""))
    return contract.frame(contract.predict_proba(clf, contract.parse(x)), identity)
