"""Tamper-evident registered models: every loader checks the version's files against the manifest
recorded at registration, and none of them runs code from the artifact store.

One tiny digits pipeline registers ``t-digits`` v1 in a real sqlite registry with a file artifact
store. The tampering is done to the stored files themselves: one byte of the backbone weights of
v1 (restored afterwards), or copies of v1's files registered as further versions of the same run
(same tags, so the same manifest) with a file added or removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml

from tests.conftest import digits_config, error_text, run_cli

NAME = "t-digits"
WEIGHTS = "artifacts/linear-probe/backbone.safetensors"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from sklearn.datasets import load_digits

    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking.setup import embedded_uri

    root = tmp_path_factory.mktemp("integrity")
    work = root / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        cfg = digits_config(work)
        cfg["data"]["labels_per_class"] = None  # the monitor needs a reference (a validation split)
        run_pipeline(validate_config(cfg))
    d = load_digits()
    keep = np.isin(d.target, [0, 1, 2])
    data = root / "new.npz"
    np.savez(data, x=np.round(d.images[keep][:40] * (255.0 / 16.0)).astype(np.uint8), y=d.target[keep][:40])
    pull = root / "pull.yaml"
    pull.write_text(yaml.safe_dump(digits_config(work, source={"model": f"mlflow:models:/{NAME}/1"})))
    return SimpleNamespace(work=work, uri=embedded_uri(work), data=data, pull=pull)


@pytest.fixture
def store(reg):
    from mlflow import MlflowClient

    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    return MlflowClient()


def stored_dir(store, version: str) -> Path:
    """Where the file artifact store keeps the version's model files."""
    return Path(urlparse(store.get_model_version_download_uri(NAME, version)).path)


def manifest_of(store, version: str) -> dict:
    import mlflow

    from tlops.tracking.integrity import MANIFEST_TAG, manifest_path

    mv = store.get_model_version(NAME, version)
    where = manifest_path(mv.tags[MANIFEST_TAG])
    return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=where)).read_text())


def copy_version(store, tmp_path: Path, tags: dict | None = None) -> tuple[str, Path]:
    """A new version of t-digits holding a copy of v1's files, in v1's run, with v1's tags."""
    v1 = store.get_model_version(NAME, "1")
    dst = tmp_path / "copy"
    shutil.copytree(stored_dir(store, "1"), dst)
    mv = store.create_model_version(NAME, str(dst), run_id=v1.run_id, tags=v1.tags if tags is None else tags)
    return str(mv.version), dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_register_records_the_digest_of_every_stored_model_file(reg, store):
    from tlops.tracking.integrity import MANIFEST_TAG

    mv = store.get_model_version(NAME, "1")
    root = stored_dir(store, "1")
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    manifest = manifest_of(store, "1")
    assert {"MLmodel", "pyfunc_model.py", WEIGHTS, "artifacts/contract.json"} <= set(manifest["files"])
    assert manifest["files"] == {rel: {"sha256": sha(p), "size": p.stat().st_size} for rel, p in files.items()}
    # the tag binds the manifest (stored in the artifact store, like the files) to the registry
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert mv.tags[MANIFEST_TAG] == hashlib.sha256(canonical).hexdigest()
    registration = json.loads(next(reg.work.glob("runs/*/register/registration.json")).read_text())
    assert registration["tags"][MANIFEST_TAG] == mv.tags[MANIFEST_TAG]
    # the weights recorded are the ones the pipeline trained
    trained = next(reg.work.glob("runs/*/fine-tune/models/linear-probe"))
    for f in ("backbone.safetensors", "head.safetensors", "bundle.json"):
        assert manifest["files"][f"artifacts/linear-probe/{f}"]["sha256"] == sha(trained / f)


def test_record_refuses_a_store_that_does_not_hold_what_was_uploaded(reg, store):
    from tlops.errors import ModelError
    from tlops.tracking.integrity import record

    mv = store.get_model_version(NAME, "1")
    stored = manifest_of(store, "1")["files"][WEIGHTS]["sha256"]
    with pytest.raises(ModelError) as e:
        record(NAME, "1", mv.run_id, expect={WEIGHTS: "0" * 64})
    assert str(e.value) == (
        f"register: {NAME} v1: the artifact store does not hold the files just uploaded: "
        f"{WEIGHTS} (uploaded sha256 000000000000, stored {stored[:12]})"
    )


def test_an_untouched_version_loads_in_every_consumer(reg, store, monkeypatch, capsys, tmp_path):
    from tlops.serving.registry import ModelRef
    from tlops.serving.server import load_version
    from tlops.tracking import integrity, registry

    w = ["--workdir", str(reg.work)]
    code, out, err = run_cli(
        monkeypatch, capsys, "predict", f"{NAME}/1", "--data", str(reg.data), "--out", str(tmp_path / "p.jsonl"), *w
    )
    assert code == 0, err
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 40
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "monitor",
        f"{NAME}/1",
        "--data",
        str(reg.data),
        "--out",
        str(tmp_path / "m"),
        "--permutations",
        "20",
        "--no-log",
        *w,
    )
    assert code == 0, err
    loaded = load_version(ModelRef(NAME, None, "1"))
    assert loaded.contract.classes == ["0", "1", "2"]
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "step",
        "pull-model",
        "--config",
        str(reg.pull),
        "--out",
        str(tmp_path / "pull"),
        "--no-reuse",
    )
    assert code == 0, err
    registry.promote(NAME, "1")
    with integrity.champion_bundle(NAME) as (mv, bundle):
        assert str(mv.version) == "1" and (bundle / "bundle.json").is_file()


@pytest.fixture
def one_byte_changed(reg, store):
    """v1's stored backbone weights with one byte of a tensor flipped (still a valid safetensors file:
    without the check it would load and answer with other weights); restored afterwards."""
    path = stored_dir(store, "1") / WEIGHTS
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    yield sha(path), hashlib.sha256(original).hexdigest()
    path.write_bytes(original)


def test_one_changed_byte_is_refused_by_every_consumer(reg, store, one_byte_changed, monkeypatch, capsys, tmp_path):
    from tlops.config import SourceConfig
    from tlops.errors import ModelError
    from tlops.models.sources import pull
    from tlops.serving.registry import ModelRef
    from tlops.serving.server import load_version
    from tlops.tracking import integrity, registry

    got, expected = one_byte_changed
    message = (
        f"refusing to load {NAME} v1: its files differ from the integrity manifest recorded at registration: "
        f"{WEIGHTS} changed (expected sha256 {expected[:12]}, got {got[:12]})"
    )
    w = ["--workdir", str(reg.work)]
    runs = {
        "predict": ["predict", f"{NAME}/1", "--data", str(reg.data), "--out", str(tmp_path / "p.parquet"), *w],
        "monitor": ["monitor", f"{NAME}/1", "--data", str(reg.data), "--out", str(tmp_path / "m"), "--no-log", *w],
        "serve": ["serve", f"{NAME}/1", "--port", "0", *w],
        "pull-model": ["step", "pull-model", "--config", str(reg.pull), "--out", str(tmp_path / "pull"), "--no-reuse"],
    }
    for what, args in runs.items():
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert (code, error_text(err)) == (1, f"error: {message}\n"), what
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "pull" / "manifest.json").exists()
    with pytest.raises(ModelError) as e:
        load_version(ModelRef(NAME, None, "1"))
    assert str(e.value) == message
    with pytest.raises(ModelError) as e:
        pull(SourceConfig(model=f"mlflow:models:/{NAME}/1"), tmp_path / "pulled")
    assert str(e.value) == message
    registry.promote(NAME, "1")  # evaluate's champion comparison loads the champion the same way
    with pytest.raises(ModelError) as e, integrity.champion_bundle(NAME):
        pass
    assert str(e.value) == message


def test_an_added_or_a_removed_file_is_refused(reg, store, tmp_path):
    from tlops.errors import ModelError
    from tlops.serving.registry import ModelRef, load

    version, copy = copy_version(store, tmp_path / "a")
    (copy / "artifacts" / "extra.py").write_text("print('hello')\n")
    with pytest.raises(ModelError) as e:
        load(ModelRef(NAME, None, version))
    assert str(e.value) == (
        f"refusing to load {NAME} v{version}: its files differ from the integrity manifest recorded at registration: "
        f"artifacts/extra.py is not in the manifest (sha256 {sha(copy / 'artifacts' / 'extra.py')[:12]})"
    )
    version, copy = copy_version(store, tmp_path / "r")
    head = manifest_of(store, "1")["files"]["artifacts/linear-probe/head.safetensors"]["sha256"]
    (copy / "artifacts" / "linear-probe" / "head.safetensors").unlink()
    with pytest.raises(ModelError) as e:
        load(ModelRef(NAME, None, version))
    assert str(e.value) == (
        f"refusing to load {NAME} v{version}: its files differ from the integrity manifest recorded at registration: "
        f"artifacts/linear-probe/head.safetensors is missing (expected sha256 {head[:12]})"
    )


def test_a_changed_manifest_is_refused(reg, store):
    from tlops.errors import ModelError
    from tlops.serving.registry import ModelRef, load
    from tlops.tracking.integrity import MANIFEST_TAG, manifest_path

    mv = store.get_model_version(NAME, "1")
    where = manifest_path(mv.tags[MANIFEST_TAG])
    path = Path(urlparse(store.get_run(mv.run_id).info.artifact_uri).path) / where
    original = path.read_bytes()
    doctored = json.loads(original)
    del doctored["files"][WEIGHTS]  # e.g. to slip other weights past the check
    path.write_text(json.dumps(doctored, sort_keys=True, separators=(",", ":")))
    try:
        with pytest.raises(ModelError) as e:
            load(ModelRef(NAME, None, "1"))
        got = sha(path)
    finally:
        path.write_bytes(original)
    assert str(e.value) == (
        f"refusing to load {NAME} v1: its integrity manifest ({where} in run {mv.run_id}) was changed "
        f"(expected sha256 {mv.tags[MANIFEST_TAG][:12]}, got {got[:12]}); the artifact store copy is not what was "
        "registered"
    )


def test_a_version_without_a_manifest_is_refused_unless_allowed(reg, store, tmp_path, monkeypatch):
    from tlops.errors import ModelError
    from tlops.serving.registry import ModelRef, load
    from tlops.tracking.integrity import ALLOW_ENV, MANIFEST_TAG

    tags = {k: v for k, v in store.get_model_version(NAME, "1").tags.items() if k != MANIFEST_TAG}
    version, _ = copy_version(store, tmp_path, tags=tags)
    with pytest.raises(ModelError) as e:
        load(ModelRef(NAME, None, version))
    assert str(e.value) == (
        f"refusing to load {NAME} v{version}: it has no integrity manifest (tag {MANIFEST_TAG}): it was registered "
        f"before tlops recorded one, or not by tlops; register the model again, or set {ALLOW_ENV}=1 to load "
        "versions without one"
    )
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert load(ModelRef(NAME, None, version)).contract.classes == ["0", "1", "2"]


def test_tlops_loaders_run_no_code_from_the_store(reg, store, tmp_path):
    """A version whose stored pyfunc_model.py does something else, with a manifest recorded for it:
    mlflow.pyfunc.load_model runs that file; tlops' loader reads weights and JSON only."""
    import mlflow

    from tlops.serving.registry import ModelRef, load
    from tlops.tracking import integrity

    marker = tmp_path / "ran"
    tags = {k: v for k, v in store.get_model_version(NAME, "1").tags.items() if k != integrity.MANIFEST_TAG}
    version, copy = copy_version(store, tmp_path, tags=tags)
    code = copy / "pyfunc_model.py"
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + code.read_text())
    mv = store.get_model_version(NAME, version)
    store.set_model_version_tag(NAME, version, integrity.MANIFEST_TAG, integrity.record(NAME, version, mv.run_id))
    loaded = load(ModelRef(NAME, None, version))
    assert loaded.contract.classes == ["0", "1", "2"] and not marker.exists()
    mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    assert marker.read_text() == "ran"
