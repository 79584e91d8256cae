"""The step key: the one function every runner uses to decide whether a finished artifact can stand
in for running a step.

``step_key(spec, cfg, inputs)`` hashes, and only hashes:

- the step's name;
- the tlops version and the versions of the libraries that shape artifact contents
  (:data:`KEY_LIBRARIES`): an upgrade of one of them recomputes everything rather than mixing
  artifacts made by two versions;
- the values of the config fields the step declares in ``StepSpec.params`` (dotted paths; the
  same list DVC tracks in ``params.yaml``), so a field no step declares changes no key;
- the content hashes of its input artifacts (the names declared in ``StepSpec.inputs``);
- the step's ``stamp(cfg, inputs)`` when its module defines one: state outside the config that
  the step reads (file stamps of the data, a resolved registry version, the current champion).

It imports no torch and reads no artifact payloads, so a fully reused pipeline stays cheap and a
KFP task can call it before deciding to do any work. The registry stamps are answered from
:mod:`tlops.tracking.memo` while a local SQLite store is unchanged, so then it imports no MLflow.
The key is written into every artifact's manifest (``step_key``) by the runner that produced it.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import TYPE_CHECKING, Any, Mapping

from tlops import __version__
from tlops.hashing import hash_json

if TYPE_CHECKING:
    from tlops.artifacts import Artifact
    from tlops.config import PipelineConfig
    from tlops.dag import StepSpec

# Libraries whose version can change what a step writes (numerics of torch kernels, model
# definitions and init in timm/transformers, numpy's RNG streams and the bundled sklearn data,
# image decoding in pillow). mlflow, kfp, dvc, boto3 and the like move bytes around: not here.
KEY_LIBRARIES = ("numpy", "scikit-learn", "pillow", "torch", "timm", "transformers", "safetensors")
WHOLE_CONFIG = "*"  # a StepSpec.params entry: the step reads every field (e.g. records the config hash)
KEY_SCHEMA = 1  # bump when the composition of the key changes


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """The installed versions of :data:`KEY_LIBRARIES` (metadata only: nothing is imported)."""
    out: dict[str, str | None] = {}
    for pkg in KEY_LIBRARIES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _lookup(d: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def param_values(spec: "StepSpec", cfg: "PipelineConfig") -> dict[str, Any]:
    """The values of the config fields ``spec`` reads, keyed by their dotted path."""
    d = cfg.to_dict()
    if WHOLE_CONFIG in spec.params:
        return {WHOLE_CONFIG: d}
    return {p: _lookup(d, p) for p in spec.params}


def reads(spec: "StepSpec", field: str) -> bool:
    """Whether the config field ``field`` (a dotted path) is covered by ``spec.params``."""
    return any(p == WHOLE_CONFIG or field == p or field.startswith(p + ".") for p in spec.params)


def step_stamp(spec: "StepSpec", cfg: "PipelineConfig", inputs: Mapping[str, "Artifact"]) -> Any:
    """The step's ``stamp(cfg, inputs)`` (state outside the config), or None if it has none."""
    from tlops.steps import get_step

    stamp = getattr(get_step(spec.name), "stamp", None)
    return None if stamp is None else stamp(cfg, inputs)


def key_parts(
    spec: "StepSpec", cfg: "PipelineConfig", inputs: Mapping[str, "Artifact"], image_digest: str | None = None
) -> dict[str, Any]:
    """What :func:`step_key` hashes (for debugging a surprising miss: diff two of these).

    ``image_digest``: the digest of the container image the step runs in, when it is pinned by one
    (a KFP task); a tag names no fixed content, so it is not part of the key."""
    missing = sorted(set(spec.inputs) - set(inputs))
    if missing:
        raise KeyError(f"step {spec.name} takes inputs {', '.join(spec.inputs)}; missing: {', '.join(missing)}")
    return {
        "schema": KEY_SCHEMA,
        "step": spec.name,
        "tlops": __version__,
        "libraries": library_versions(),
        "params": param_values(spec, cfg),
        "inputs": {name: inputs[name].content_hash for name in sorted(spec.inputs)},
        "stamp": step_stamp(spec, cfg, inputs),
        **({"image": image_digest} if image_digest else {}),
    }


def step_key(
    spec: "StepSpec", cfg: "PipelineConfig", inputs: Mapping[str, "Artifact"], image_digest: str | None = None
) -> str:
    """The reuse key of running ``spec`` on ``cfg`` and ``inputs`` (see the module doc)."""
    return hash_json(key_parts(spec, cfg, inputs, image_digest))
