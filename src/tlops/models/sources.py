"""Resolve a source-model spec string into a model bundle directory.

Specs: ``hf:<hub-id-or-local-dir>`` (or ``hf:pkg:<package>/<dir>`` for a model shipped inside
an installed Python package), ``timm:<name>``, ``mlflow:models:/<name>@<alias>`` or
``mlflow:models:/<name>/<version>``, or a path to a tlops bundle directory.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from tlops.config import SourceConfig
from tlops.errors import ModelError
from tlops.models.bundle import is_bundle, read_spec, save_bundle

log = logging.getLogger(__name__)

SOURCES = ("hf:<hub-id-or-dir>", "hf:pkg:<package>/<dir>", "timm:<name>", "mlflow:models:/<name>@<alias>", "mlflow:models:/<name>/<version>", "<bundle dir>")
_MLFLOW_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def package_dir(ref: str) -> str:
    """``pkg:<python package>/<sub/dir>`` -> a directory shipped inside an installed package."""
    import importlib.util

    pkg, _, sub = ref.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"source.model: Python package '{pkg}' is not installed (needed for hf:{ref})")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.is_dir():
        raise ModelError(f"source.model: {path} does not exist inside package '{pkg}'")
    return str(path)


def parse_spec(spec: str) -> tuple[str, str]:
    if spec.startswith("hf:"):
        ref = spec[3:]
        return "hf", package_dir(ref) if ref.startswith("pkg:") else ref
    if spec.startswith("timm:"):
        return "timm", spec[5:]
    if spec.startswith("mlflow:"):
        ref = spec[7:]
        if not _MLFLOW_RE.match(ref):
            raise ModelError(
                f"source.model: bad MLflow reference '{spec}'; use mlflow:models:/<name>@<alias> or mlflow:models:/<name>/<version>"
            )
        return "mlflow", ref
    if Path(spec).is_dir():
        if not is_bundle(spec):
            raise ModelError(f"source.model: {spec} is a directory but not a tlops bundle (no bundle.json)")
        return "bundle", spec
    raise ModelError(f"Unknown model source '{spec}'; valid sources: {', '.join(SOURCES)}")


def resolve_mlflow(ref: str) -> dict[str, Any]:
    """Resolve an alias/version to a concrete registry entry (cheap: no download)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = _MLFLOW_RE.match(ref)
    assert m
    client = MlflowClient()
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise ModelError(f"source.model: cannot resolve mlflow:{ref} in the MLflow registry: {e.message}") from None
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source}


def fingerprint(cfg: SourceConfig) -> Any:
    """What identifies the pulled model without pulling it."""
    from tlops.hashing import stat_fingerprint

    kind, ref = parse_spec(cfg.model)
    if kind == "mlflow":
        return resolve_mlflow(ref)
    if kind == "bundle" or (kind == "hf" and Path(ref).is_dir()):
        return stat_fingerprint(ref)
    if cfg.weights:
        return [ref, stat_fingerprint(cfg.weights)] if Path(cfg.weights).exists() else [ref, "missing"]
    return ref


def pull(cfg: SourceConfig, out: Path) -> dict[str, Any]:
    """Write a backbone bundle for ``cfg.model`` into ``out``; return the bundle spec."""
    kind, ref = parse_spec(cfg.model)
    if kind == "bundle":
        return _copy_bundle(Path(ref), out, cfg.model)
    if kind == "mlflow":
        return _pull_mlflow(ref, out)
    if kind == "hf":
        return _pull_hf(ref, cfg, out)
    return _pull_timm(ref, cfg, out)


def _copy_bundle(src: Path, out: Path, source: str, **extra: Any) -> dict[str, Any]:
    """Re-save the backbone of any bundle (dropping a head): also proves the weights load."""
    from tlops.models.bundle import load_backbone

    spec = read_spec(src)
    backbone = load_backbone(src)
    return save_bundle(out, backbone, extra={"source": source, "origin_digest": spec.get("digest"), **extra})


def _pull_mlflow(ref: str, out: Path) -> dict[str, Any]:
    import mlflow

    entry = resolve_mlflow(ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{entry['name']}/{entry['version']}", dst_path=tmp))
        bundles = [p.parent for p in local.rglob("bundle.json")]
        if not bundles:
            raise ModelError(f"source.model: mlflow:{ref} (version {entry['version']}) holds no tlops bundle; was it registered by tlops?")
        log.info("pull-model: mlflow:%s -> %s version %s", ref, entry["name"], entry["version"])
        return _copy_bundle(bundles[0], out, f"mlflow:{ref}", mlflow=entry)


def _pull_hf(ref: str, cfg: SourceConfig, out: Path) -> dict[str, Any]:
    from tlops.models.backbone import TextBackbone

    if not Path(ref).is_dir() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise ModelError(f"source.model: local model directory not found: {ref}")
    try:
        backbone = TextBackbone.create(ref, max_length=cfg.max_length, pooling=cfg.pooling)
    except OSError as e:
        where = "local directory" if Path(ref).is_dir() else "Hugging Face Hub id (is the hub reachable? for offline use, point hf: at a local directory)"
        raise ModelError(f"source.model: cannot load hf:{ref} as a {where}: {e}") from None
    return save_bundle(out, backbone, extra={"source": f"hf:{ref}"})


def _pull_timm(ref: str, cfg: SourceConfig, out: Path) -> dict[str, Any]:
    import timm

    from tlops.models.backbone import ImageBackbone

    if not timm.is_model(ref):
        close = timm.list_models(f"*{ref.split('.')[0][:6]}*")[:8]
        raise ModelError(f"source.model: unknown timm model '{ref}'; similar names: {', '.join(close) or 'none'} (see timm.list_models())")
    from_file = cfg.weights is not None
    try:
        backbone = ImageBackbone.create(ref, pretrained=cfg.pretrained and not from_file, in_chans=cfg.in_chans, image_size=cfg.image_size)
    except Exception as e:  # hub download failures come in many types
        raise ModelError(
            f"source.model: cannot create timm:{ref} with pretrained weights ({type(e).__name__}: {e}); "
            "offline, pass source.weights=<file> or source.pretrained=false"
        ) from None
    if from_file:
        _load_weights_file(backbone.model, Path(cfg.weights))
    return save_bundle(out, backbone, extra={"source": f"timm:{ref}", "pretrained": bool(cfg.pretrained or from_file)})


def _load_weights_file(model, path: Path) -> None:
    import torch

    if not path.is_file():
        raise ModelError(f"source.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"source.weights: cannot load {path} safely (weights_only=True): {e}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ModelError(
            f"source.weights: {path} does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
