"""artifacts.py and the local feature cache at the file level, on real directories, in about a second.

The pipeline tests reach this code through whole steps; these pin each operation's contract
directly (what is on disk afterwards, what is refused and with which message), so `make mutation`
can run them for every mutant of the two modules.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tlops import artifacts as A
from tlops.errors import ArtifactError
from tlops.features.cache import KIND, FeatureCache, cache_key


def _make(out, kind="dataset", files=None, metadata=None, inputs=None, config=None):
    with A.write_artifact(out, kind, config=config, inputs=inputs) as w:
        for rel, text in (files or {"a.txt": "A"}).items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_text(text)
        w.metadata = metadata or {"n": 1}
    return A.read_artifact(out)


def test_write_artifact_manifest_fields_and_inputs(tmp_path):
    src = _make(tmp_path / "src")
    art = _make(tmp_path / "out", "evaluation", metadata={"acc": 0.5}, inputs={"data": src}, config={"k": 1})
    m = json.loads((tmp_path / "out" / A.MANIFEST).read_text())
    assert m["kind"] == "evaluation" and art.kind == "evaluation"
    assert m["schema_version"] == A.SCHEMA_VERSION == 1
    assert m["inputs"] == {"data": {"kind": "dataset", "content_hash": src.content_hash}}
    assert m["config"] == {"k": 1} and art.meta == {"acc": 0.5}
    assert m["content_hash"] == A.content_hash_of(tmp_path / "out", "evaluation", {"acc": 0.5})
    assert set(m["versions"]) >= {"tlops", "python"} and m["created_at"].endswith("Z")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert A.Artifact(tmp_path / "x").meta == {}  # no manifest loaded: no metadata


def test_manifests_record_the_versions_of_the_libraries_that_made_them(monkeypatch):
    """``versions``: tlops, Python and each library whose version changes what a step computes;
    a library that is not installed (timm in a text-only image) is left out, not an error."""
    import platform
    from importlib import metadata

    from tlops import __version__

    libs = ("torch", "timm", "transformers", "mlflow", "scikit-learn", "numpy")
    want = {"tlops": __version__, "python": platform.python_version()} | {p: metadata.version(p) for p in libs}
    assert A.library_versions() == want
    real = metadata.version

    def no_timm(pkg):
        if pkg == "timm":
            raise metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(metadata, "version", no_timm)
    assert A.library_versions() == {k: v for k, v in want.items() if k != "timm"}


def test_manifest_stamps_utc_and_keeps_metadata_json_cannot_hold_as_text(tmp_path, monkeypatch):
    """``created_at`` is UTC whatever the local time zone (it sorts runs made on machines in other
    zones); metadata values JSON has no type for (a path) are stored as their text, not refused."""
    import time
    from datetime import datetime, timedelta, timezone
    from pathlib import Path

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        _make(tmp_path / "out", metadata={"source": Path("/data/x.csv")})
    finally:
        monkeypatch.undo()
        time.tzset()
    m = json.loads((tmp_path / "out" / A.MANIFEST).read_text())
    assert m["metadata"] == {"source": "/data/x.csv"}
    made = datetime.strptime(m["created_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - made) < timedelta(minutes=5)


def test_write_artifact_failure_and_overwrite_leave_the_old_one(tmp_path):
    out = tmp_path / "out"
    old = _make(out, files={"a.txt": "old"})
    with pytest.raises(RuntimeError):
        with A.write_artifact(out, "dataset") as w:
            (w.path / "a.txt").write_text("new")
            raise RuntimeError("step died")
    with pytest.raises(ArtifactError, match=rf"^{out} already exists$"):
        with A.write_artifact(out, "dataset", overwrite=False) as w:
            (w.path / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old" and A.read_artifact(out).content_hash == old.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _make(out, files={"a.txt": "new"})  # overwrite=True (default) replaces it
    assert (out / "a.txt").read_text() == "new"


def test_read_artifact_refusals(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError) as err:
        A.read_artifact(tmp_path / "half")
    assert str(err.value) == (
        f"{tmp_path / 'half'} is not a finished tlops artifact (no manifest.json); rerun the step that produces it"
    )
    assert not A.is_finished(tmp_path / "half")
    _make(tmp_path / "d")
    assert A.is_finished(tmp_path / "d")
    assert A.read_artifact(tmp_path / "d", "dataset").kind == "dataset"
    with pytest.raises(ArtifactError) as err:
        A.read_artifact(tmp_path / "d", "model")
    assert str(err.value) == f"{tmp_path / 'd'} is a 'dataset' artifact, expected 'model'"


def test_content_hash_ignores_run_facts_provenance_and_unhashed_files(tmp_path):
    def h(files, meta, kind="dataset"):
        d = tmp_path / f"h{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        return A.content_hash_of(d, kind, meta)

    base = h({"r.json": json.dumps({"acc": 1, "seconds": 3})}, {"n": 1, "source": "a"})
    assert base == h({"r.json": json.dumps({"seconds": 9, "acc": 1})}, {"n": 1, "source": "b"})
    assert base == h({"r.json": json.dumps({"acc": 1, "seconds": 3})}, {"n": 1, "created_at": "x", "run_id": "y"})
    assert base != h({"r.json": json.dumps({"acc": 2})}, {"n": 1})
    assert base != h({"r.json": json.dumps({"acc": 1})}, {"n": 2})
    assert base != h({"s.json": json.dumps({"acc": 1})}, {"n": 1})  # the path counts
    nested = {"runs": [{"seconds": 1, "x": 1}], "reused": True, "train_seconds": 5}
    assert h({}, nested) == h({}, {"runs": [{"x": 1}]})
    # bytes of non-JSON files count; a .json file that does not parse is hashed as bytes
    assert h({"w.bin": "1"}, {}) != h({"w.bin": "2"}, {})
    assert h({"bad.json": "{"}, {}) != h({"bad.json": "{{"}, {})
    # files no later step reads (renderings, checkpoints) are skipped for their kind only
    assert h({"report.md": "1"}, {}, "evaluation") == h({"report.md": "2"}, {}, "evaluation")
    assert h({"report.md": "1"}, {}, "dataset") != h({"report.md": "2"}, {}, "dataset")
    ck = "models/m/checkpoints/last.pt"
    assert h({ck: "1"}, {}, "trained-models") == h({ck: "2"}, {}, "trained-models")
    # the manifest itself is never hashed
    assert h({A.MANIFEST: "1", "a": "x"}, {}) == h({A.MANIFEST: "2", "a": "x"}, {})


def test_publish_replaces_or_keeps_the_first(tmp_path):
    def staged(name, text):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(text)
        (d / A.MANIFEST).write_text("{}")
        return d

    out = tmp_path / "sub" / "deeper" / "out"  # parents made as needed
    A.publish(staged("t1", "1"), out)
    assert (out / "f").read_text() == "1" and not (tmp_path / "t1").exists()
    A.publish(staged("t2", "2"), out)  # replace=True: the new one wins
    assert (out / "f").read_text() == "2" and not (tmp_path / "t2").exists()
    A.publish_dir(staged("t3", "3"), out)  # a finished entry already there wins
    assert (out / "f").read_text() == "2" and not (tmp_path / "t3").exists()
    os.remove(out / A.MANIFEST)  # half-deleted entry: never trusted, replaced
    A.publish_dir(staged("t4", "4"), out)
    assert (out / "f").read_text() == "4"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # nothing left aside
    with pytest.raises(OSError):
        A.publish(tmp_path / "missing", tmp_path / "new", replace=False)


def test_copy_artifact_links_files_and_refuses_an_unfinished_source(tmp_path):
    src = _make(tmp_path / "src", files={"a.txt": "A", "d/b.txt": "B"})
    copy = A.copy_artifact(src.path, tmp_path / "runs" / "r1" / "copy")  # parents created
    assert copy.content_hash == src.content_hash and (copy.path / "d" / "b.txt").read_text() == "B"
    assert os.stat(copy.path / "a.txt").st_ino == os.stat(src.path / "a.txt").st_ino  # hard link
    os.remove(src.path / A.MANIFEST)
    with pytest.raises(ArtifactError, match="is not a finished tlops artifact"):
        A.copy_artifact(src.path, tmp_path / "runs" / "r1" / "copy2")
    assert sorted(p.name for p in (tmp_path / "runs" / "r1").iterdir()) == ["copy"]  # no staging left


def test_link_or_copy_falls_back_to_a_copy(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("x")

    def no_link(src, dst):
        raise OSError("cross-device")

    monkeypatch.setattr(os, "link", no_link)
    A.link_or_copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "x"
    assert os.stat(tmp_path / "b").st_ino != os.stat(tmp_path / "a").st_ino


def test_set_step_key_rewrites_the_manifest_only_when_it_changes(tmp_path):
    art = _make(tmp_path / "a")
    A.set_step_key(art, "k1")
    on_disk = A.read_artifact(art.path).manifest
    assert on_disk["step_key"] == "k1" and "environment" not in on_disk
    keep = tmp_path / "manifest-link"  # holds the inode: a rewrite cannot get it back by reuse
    os.link(art.path / A.MANIFEST, keep)
    A.set_step_key(art, "k1")  # unchanged: the file is not rewritten
    assert os.path.samefile(art.path / A.MANIFEST, keep)
    A.set_step_key(art, "k1", {"threads": 2})
    on_disk = A.read_artifact(art.path).manifest
    assert on_disk["step_key"] == "k1" and on_disk["environment"] == {"threads": 2}
    keep.unlink()
    os.link(art.path / A.MANIFEST, keep)
    A.set_step_key(art, "k1", {"threads": 2})  # same key, same environment: not rewritten
    assert os.path.samefile(art.path / A.MANIFEST, keep)
    A.set_step_key(art, "k1")  # same key, no environment given: not rewritten either
    assert os.path.samefile(art.path / A.MANIFEST, keep)
    A.set_step_key(art, "k1", {"threads": 4})  # another environment: rewritten
    assert A.read_artifact(art.path).manifest["environment"] == {"threads": 4}
    A.set_step_key(art, "k2")  # environment None: the recorded one stays
    on_disk = A.read_artifact(art.path).manifest
    assert on_disk["step_key"] == "k2" and on_disk["environment"] == {"threads": 4}
    assert list(on_disk)[: len(art.manifest)] == list(art.manifest)  # key order as written
    assert [p.name for p in art.path.iterdir() if p.name.startswith(".")] == []


def test_local_feature_cache_put_get_load_and_compute_once(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = cache_key("model-digest", {"size": 8}, "data-hash")
    # pinned: every cache entry anyone has is filed under this; a change must bump CACHE_VERSION on purpose
    assert key == "c04b6aa499d081702424f07f4f4495bf139fb594de8bd401cf054a0fa4c98b13"
    assert key != cache_key("model-digest", {"size": 9}, "data-hash")
    assert cache.entry(key) == tmp_path / "cache" / key[:2] / key
    assert cache.lock_path(key) == tmp_path / "cache" / ".locks" / f"{key}.lock"
    assert cache.get(key) is None
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(6.0).reshape(3, 2), "y": np.array([0, 1, 2])}

    got = cache.get_or_compute_arrays(key, compute, {"n": 3})
    assert calls == [1] and np.array_equal(got["x"], np.arange(6.0).reshape(3, 2))
    entry = cache.get(key)
    assert entry == cache.entry(key)
    art = A.read_artifact(entry, KIND)
    assert art.content_hash == key and art.meta == {"n": 3, "cache_key": key}
    again = cache.get_or_compute_arrays(key, compute, {"n": 3})  # a hit: compute not called
    assert calls == [1] and sorted(again) == ["x", "y"] and np.array_equal(again["y"], [0, 1, 2])
    loaded = cache.load(key)
    assert np.array_equal(loaded["x"], got["x"])
    # disabled: computes every time and stores nothing
    other = cache_key("m", {}, "d")
    cache.get_or_compute_arrays(other, compute, {}, enabled=False)
    assert calls == [1, 1] and cache.get(other) is None
    # put of a new key stores its arrays and metadata; of a key that is stored, the entry stays as it was
    fresh = cache_key("model-digest", {"size": 8}, "other-data")
    assert cache.put(fresh, {"z": np.arange(3)}, {"m": 1}) == cache.entry(fresh)
    assert np.array_equal(cache.load(fresh)["z"], [0, 1, 2]) and sorted(cache.load(fresh)) == ["z"]
    assert A.read_artifact(cache.get(fresh), KIND).meta == {"m": 1, "cache_key": fresh}
    assert cache.put(key, {"x": np.zeros(1)}, {"n": 0}) == entry
    assert np.array_equal(cache.load(key)["x"], got["x"])
    assert cache.get_or_compute(cache_key("m", {}, "miss"), compute, {}, tmp_path / "m.npz") is False  # a miss
    assert cache.get_or_compute(cache_key("m", {}, "off"), compute, {}, tmp_path / "o.npz", enabled=False) is False
    dst = tmp_path / "f.npz"
    assert cache.get_or_compute(key, compute, {}, dst) is True and dst.is_file()
    assert os.stat(dst).st_ino == os.stat(entry / "features.npz").st_ino  # fetched as a hard link


def test_a_cache_entry_holding_pickled_objects_is_refused(tmp_path):
    """features.npz files are data only: an entry whose arrays need unpickling (a tampered or foreign
    file) is refused on load instead of running pickle on it."""
    cache = FeatureCache(tmp_path / "cache")
    key = cache_key("m", {}, "d")
    evil = tmp_path / "features.npz"
    np.savez(evil, x=np.array([{"a": 1}], dtype=object))
    cache.put_file(key, evil, {})
    with pytest.raises(ValueError, match="allow_pickle"):
        cache.load(key)
    with pytest.raises(ValueError, match="allow_pickle"):
        cache.get_or_compute_arrays(key, lambda: {}, {})
