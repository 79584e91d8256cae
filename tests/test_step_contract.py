"""The step contract: every config field a step reads is declared in its StepSpec, and the step key
and the DVC params both follow that declaration exactly.

The walk below enumerates every leaf field of ``PipelineConfig`` (recursively, including the
fields of optional sections, which are first set to a valid value), changes it to another valid
value, and checks for every step: its key changed <=> it declares the field <=> its DVC params
changed. Stamps (state outside the config: file stamps, registry lookups) are held fixed here;
tests/test_cache_mutations.py covers them.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel

from tests.conftest import digits_config
from tlops import contract
from tlops.artifacts import Artifact
from tlops.config import PipelineConfig, validate_config
from tlops.contract import WHOLE_CONFIG, reads, step_key
from tlops.dag import DAG
from tlops.errors import ConfigError
from tlops.runners import dvc

# Optional sections get a valid value before their own fields are walked.
SECTIONS: dict[str, Any] = {
    "data.adapt_from": {"source": "sklearn:digits"},
    "data.dvc": {"repo": "/tmp/dvc-repo", "path": "data/digits.npz"},
    "kubernetes.gpu": {},
    "tune": {"space": {"train.lr": {"low": 1e-4, "high": 1e-2}}},
}
# A few fields that validators tie to others: the value to try first (the rest are generated).
PREFERRED: dict[str, list[Any]] = {
    "source.model": ["timm:resnet18"],
    "source.candidates": [["timm:resnet34"]],
    "data.source": ["sklearn:iris"],
    "train.strategies": [["linear-probe", "stacking"]],  # stacking: extract-features adds the candidates
    "train.select_on": ["val"],
    "train.probe_c": [[0.5, 2.0]],
    "name": ["other-name"],
    "kubernetes.secrets": [[{"name": "s3", "env": {"AWS_ACCESS_KEY_ID": "key"}}]],
    "kubernetes.gpu.tolerations": [[{"key": "dedicated", "operator": "Exists"}]],
    "tune.space": [{"train.epochs": {"low": 1, "high": 3}}],
}


def _model_of(ann: Any) -> type[BaseModel] | None:
    for a in (ann, *typing.get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, f in model.model_fields.items():
        path = prefix + name
        sub = _model_of(f.annotation)
        if sub is not None and typing.get_origin(f.annotation) not in (list, dict):  # dict: keys are data
            out += _leaves(sub, path + ".")
        else:
            out.append((path, f.annotation))
    return out


def _candidates(ann: Any, cur: Any) -> list[Any]:
    """Valid-looking values of type ``ann`` that differ from ``cur`` (the validator has the last word)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return [v for a in args if a is not type(None) for v in _candidates(a, cur)]
    if origin is Literal:
        return [a for a in args if a != cur]
    if ann is bool:
        return [not cur]
    if ann is int:
        return [v for v in ((cur or 0) + 1, (cur or 0) - 1, 2, 1, 16, 100) if v != cur]
    if ann is float:
        return [v for v in ((cur or 0.1) / 2, 0.3, 0.05, 1.5, 0.9) if v != cur]
    if ann is str:
        return [v for v in ((cur or "") + "x", "x", "31s", "/tmp/elsewhere") if v != cur]
    if origin is list:
        return [[*(cur or []), "x"], ["x"], [0, 1], [1, 0, 2]]
    if origin is dict:
        return [{**(cur or {}), "k": "v"}]
    if ann is Any:
        return ["x", 1]
    raise AssertionError(f"no candidate values for {ann}")


def _get(d: dict, path: str) -> Any:
    for p in path.split("."):
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _set(d: dict, path: str, value: Any) -> None:
    *head, last = path.split(".")
    for p in head:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[last] = value


def _base(path: str) -> dict:
    raw = digits_config("/tmp/tlops-contract-work", train={"strategies": ["linear-probe"]})
    raw["source"]["candidates"] = ["timm:resnet18"]
    for section, value in SECTIONS.items():
        if path.startswith(section + "."):
            if section == "data.dvc":
                raw["data"].pop("source")
            _set(raw, section, copy.deepcopy(value))
    return raw


def _mutate(path: str, ann: Any) -> tuple[PipelineConfig, PipelineConfig]:
    raw = _base(path)
    base = validate_config(raw)
    cur = _get(base.to_dict(), path)
    for value in PREFERRED.get(path, []) + _candidates(ann, cur):
        new = copy.deepcopy(raw)
        _set(new, path, value)
        try:
            changed = validate_config(new)
        except ConfigError:
            continue
        if _get(changed.to_dict(), path) != cur:
            return base, changed
    raise AssertionError(f"{path}: found no other valid value (extend PREFERRED)")


def _inputs() -> dict[str, Artifact]:
    return {
        s.output_name: Artifact(
            path=None,  # type: ignore[arg-type]
            manifest={"kind": s.output, "content_hash": f"hash-of-{s.name}"},
        )
        for s in DAG
    }


def _keys(cfg: PipelineConfig) -> dict[str, str]:
    ins = _inputs()
    return {s.name: step_key(s, cfg, {n: ins[n] for n in s.inputs}) for s in DAG}


def _dvc_params(cfg: PipelineConfig) -> dict[str, Any]:
    """What DVC compares for each stage: the tracked values in params.yaml."""
    params = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    out = {}
    for name, stage in dvc.stages(cfg)["stages"].items():
        [(file, keys)] = stage["params"][0].items()
        assert file == "params.yaml"
        out[name] = params if keys is None else {k: _get(params, k) for k in keys}
    return out


LEAVES = _leaves(PipelineConfig)


def test_every_declared_param_is_a_config_field():
    paths = {p for p, _ in LEAVES}
    for s in DAG:
        for p in s.params:
            assert p == WHOLE_CONFIG or p in paths or any(q.startswith(p + ".") for q in paths), (s.name, p)


def test_walk_covers_the_optional_sections():
    paths = {p for p, _ in LEAVES}
    assert {"data.adapt_from.val", "data.dvc.rev", "kubernetes.gpu.shm_size", "train.lora.r", "seed"} <= paths
    assert len(LEAVES) > 90


@pytest.mark.parametrize("path,ann", LEAVES, ids=[p for p, _ in LEAVES])
def test_a_field_changes_exactly_the_keys_and_dvc_params_of_the_steps_that_read_it(path, ann, monkeypatch):
    monkeypatch.setattr(contract, "step_stamp", lambda spec, cfg, inputs: "fixed")
    base, changed = _mutate(path, ann)
    k0, k1 = _keys(base), _keys(changed)
    d0, d1 = _dvc_params(base), _dvc_params(changed)
    for s in DAG:
        declared = reads(s, path)
        assert (k0[s.name] != k1[s.name]) == declared, (
            f"{path}: step {s.name} {'declares' if declared else 'does not declare'} it, "
            f"but its key {'did not change' if declared else 'changed'}"
        )
        assert (d0[s.name] != d1[s.name]) == declared, (
            f"{path}: step {s.name} {'declares' if declared else 'does not declare'} it, "
            f"but its DVC params {'did not change' if declared else 'changed'}"
        )
