"""Reuse correctness, measured: each mutation below changes one thing about a finished run, and the
runner must recompute exactly the steps whose result can differ (no false hit) and reuse every
other one (no false miss).

The chain is ingest -> pull-model -> extract-features -> fine-tune through ``execute_step`` (what
``tlops run``, ``tlops step``, compose, DVC and KFP all call) on a tiny local NPZ dataset and a
random-init timm model. Registry-dependent stamps (an ``mlflow:`` alias, the champion) are
checked on the key with the registry lookups replaced.

Decisions recorded here:
- a no-op path rename (same bytes at a new path) reruns ingest: ``data.source`` is a field it
  reads and records in its manifest. Its content hash is unchanged, so every later step hits.
- touching the data file (new mtime, same bytes) reruns ingest for the same reason (the stamp
  is names/sizes/mtimes, nothing read); later steps hit.
- the key includes the tlops version and the versions of ``contract.KEY_LIBRARIES``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import digits_config
from tlops import contract
from tlops.artifacts import MANIFEST, read_artifact
from tlops.config import validate_config
from tlops.dag import get
from tlops.runners.local import execute_step

CHAIN = ("ingest", "pull-model", "extract-features", "fine-tune")
ALL = set(CHAIN)
DATA = ALL - {"pull-model"}  # new data: everything but the source model


def _write_data(path: Path, *, flip_byte: bool = False, flip_label: bool = False) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 3
    x = (d.images[keep][:90] * 16).astype(np.uint8)
    y = d.target[keep][:90].copy()
    if flip_byte:
        x[5, 3, 3] ^= 1
    if flip_label:
        y[7] = (y[7] + 1) % 3
    with open(path, "wb") as f:
        np.savez(f, x=x, y=y)


class Chain:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data" / "digits.npz"
        self.data.parent.mkdir(parents=True)
        _write_data(self.data)
        self.n = 0

    def cfg(self, **over):
        raw = digits_config(
            self.root / "work",
            data={"source": str(self.data), "classes": None, "labels_per_class": 10},
            train={"strategies": ["linear-probe"], "epochs": 1, "probe_c": [0.1, 1.0]},
        )
        for dotted, value in over.items():
            *head, last = dotted.split(".")
            d = raw
            for p in head:
                d = d.setdefault(p, {})
            d[last] = value
        return validate_config(raw)

    def run(self, cfg) -> dict[str, bool]:
        """Run the chain into a new run dir; return step -> ran (True) / reused (False)."""
        self.n += 1
        out, arts, ran = self.root / "work" / "runs" / f"r{self.n}", {}, {}
        for name in CHAIN:
            spec = get(name)
            res = execute_step(spec, cfg, {k: arts[p] for k, p in spec.inputs.items()}, out / name)
            arts[name], ran[name] = res.artifact, not res.reused
            assert res.artifact.manifest["step_key"] == contract.step_key(
                spec, cfg, {k: arts[p] for k, p in spec.inputs.items()}
            )
        self.last = out
        return ran

    def reran(self, cfg) -> set[str]:
        return {s for s, r in self.run(cfg).items() if r}


@pytest.fixture
def chain(tmp_path):
    c = Chain(tmp_path)
    assert c.reran(c.cfg()) == ALL
    return c


def test_mutations_rerun_exactly_what_can_change(chain, monkeypatch):
    c = chain
    base = c.cfg()
    results: dict[str, tuple[set[str], set[str]]] = {}

    def case(name: str, expected: set[str], cfg=None) -> None:
        results[name] = (expected, c.reran(cfg or base))

    case("nothing changed", set())
    case("kubernetes.image (read by no step)", set(), c.cfg(**{"kubernetes.image": "tlops:other"}))
    case("tracking.experiment (evaluate only)", set(), c.cfg(**{"tracking.experiment": "other"}))
    case("name (evaluate only)", set(), c.cfg(name="renamed"))
    case("train.epochs (fine-tune)", {"fine-tune"}, c.cfg(**{"train.epochs": 2}))
    case("train.probe_c (fine-tune)", {"fine-tune"}, c.cfg(**{"train.probe_c": [0.01]}))
    case("evaluate.scratch_baseline (fine-tune)", {"fine-tune"}, c.cfg(**{"evaluate.scratch_baseline": True}))
    case(
        "features.batch_size (extract-features; fine-tune reads it too)",
        {"extract-features", "fine-tune"},
        c.cfg(**{"features.batch_size": 7}),
    )
    case(
        "train.strategies (extract-features stacks by it; fine-tune)",
        {"extract-features", "fine-tune"},
        c.cfg(**{"train.strategies": ["linear-probe", "partial-fine-tune"]}),
    )
    case("source.image_size (pull-model and all after)", ALL - {"ingest"}, c.cfg(**{"source.image_size": 24}))
    case("seed (ingest, pull-model: all)", ALL, c.cfg(seed=1))
    case("data.split.test (ingest: a new split, all)", DATA, c.cfg(**{"data.split.test": 0.25}))
    case("back to the base config", set())

    time.sleep(0.01)
    c.data.touch()
    case("data touched, same bytes (ingest only)", {"ingest"})
    moved = c.data.with_name("moved.npz")
    shutil.copy2(c.data, moved)
    case("no-op path rename (ingest only)", {"ingest"}, c.cfg(**{"data.source": str(moved)}))

    _write_data(c.data, flip_byte=True)
    case("one data byte", DATA)
    _write_data(c.data, flip_byte=True, flip_label=True)
    case("one label", DATA)

    with monkeypatch.context() as m:
        m.setattr(contract, "__version__", "0.0.0-other")
        case("tlops version", ALL)
    case("tlops version back", set())
    with monkeypatch.context() as m:
        installed = contract.library_versions()
        m.setattr(contract, "library_versions", lambda: {**installed, "torch": "0.0.1"})
        case("torch version", ALL)
    case("torch version back", set())  # the index now points at this run's copies

    last = c.last
    shutil.rmtree(last / "fine-tune")
    case("the indexed fine-tune artifact deleted", {"fine-tune"})
    last = c.last
    (last / "extract-features" / MANIFEST).unlink()  # half-written: files without a manifest
    case("the indexed extract-features artifact half-written", {"extract-features"})
    last = c.last
    mf = last / "pull-model" / MANIFEST
    manifest = json.loads(mf.read_text())
    manifest["step_key"] = "0" * 64
    mf.unlink()
    mf.write_text(json.dumps(manifest))
    case("the index points at an artifact made under another key", {"pull-model"})

    bad = {n: (e, got) for n, (e, got) in results.items() if e != got}
    false_hits = {n: sorted(e - got) for n, (e, got) in bad.items() if e - got}
    false_misses = {n: sorted(got - e) for n, (e, got) in bad.items() if got - e}
    assert len(results) >= 20
    assert not false_hits and not false_misses, json.dumps([false_hits, false_misses], indent=1)


def test_source_model_weights_change_reruns_pull_model_and_after(chain):
    c = chain
    bundle = c.root / "bundle"
    shutil.copytree(c.last / "pull-model" / "model", bundle)
    cfg = c.cfg(**{"source.model": str(bundle)})
    c.reran(cfg)
    assert c.reran(cfg) == set()
    from safetensors.numpy import load_file, save_file

    weights = next(bundle.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.dtype.kind == "f")
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    assert c.reran(cfg) == ALL - {"ingest"}


def test_feature_cache_entry_without_manifest_is_recomputed_not_trusted(chain):
    c = chain
    feats = read_artifact(c.last / "extract-features")
    entry = c.root / "work" / "cache" / "features" / feats.meta["cache_key"][:2] / feats.meta["cache_key"]
    (entry / MANIFEST).unlink()
    assert c.reran(c.cfg(**{"features.batch_size": 5})) == {"extract-features", "fine-tune"}
    again = read_artifact(c.last / "extract-features")
    assert again.meta["cache"] == "miss" and (entry / MANIFEST).is_file()
    with np.load(c.last / "extract-features" / "features.npz") as a, np.load(entry / "features.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert c.reran(c.cfg(**{"features.batch_size": 6})) == {"extract-features", "fine-tune"}
    assert read_artifact(c.last / "extract-features").meta["cache"] == "hit"


def test_registry_stamps_follow_the_alias(digits_cfg, monkeypatch):
    """pull-model keys on the version an ``mlflow:`` alias resolves to; evaluate on the champion
    (none when the champion is the model under evaluation)."""
    from tlops.artifacts import Artifact
    from tlops.models import sources
    from tlops.tracking import registry, setup

    monkeypatch.setattr(setup, "configure", lambda cfg: None)
    target = {"version": "1"}
    monkeypatch.setattr(
        sources, "resolve_mlflow", lambda ref: {"name": "m", "version": target["version"], "run_id": "r", "source": "s"}
    )
    cfg = digits_cfg(source={"model": "mlflow:models:/m@champion"})
    pull = get("pull-model")
    k1 = contract.step_key(pull, cfg, {})
    target["version"] = "2"
    assert contract.step_key(pull, cfg, {}) != k1

    ev = get("evaluate")
    ins = {
        "dataset": Artifact(Path("d"), {"kind": "dataset", "content_hash": "d"}),
        "trained": Artifact(
            Path("t"), {"kind": "trained-models", "content_hash": "t", "metadata": {"selected": "a", "models": {}}}
        ),
    }
    ins["trained"].manifest["metadata"]["models"] = {"a": {"digest": "mine"}}
    champ: dict = {"mv": None}
    monkeypatch.setattr(registry, "get_alias", lambda name, alias: champ["mv"])
    none = contract.step_key(ev, cfg, ins)
    champ["mv"] = SimpleNamespace(version=3, run_id="r3", tags={registry.DIGEST_TAG: "other"})
    v3 = contract.step_key(ev, cfg, ins)
    champ["mv"] = SimpleNamespace(version=4, run_id="r4", tags={registry.DIGEST_TAG: "other"})
    v4 = contract.step_key(ev, cfg, ins)
    champ["mv"] = SimpleNamespace(version=5, run_id="r5", tags={registry.DIGEST_TAG: "mine"})
    assert len({none, v3, v4}) == 3
    assert contract.step_key(ev, cfg, ins) == none  # the champion is this very model: nothing new to compare


def test_library_versions_are_read_without_importing_them():
    import subprocess
    import sys

    code = "import sys; from tlops.contract import library_versions; library_versions(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.strip() == "False", out.stderr
    assert set(contract.library_versions()) == set(contract.KEY_LIBRARIES)
