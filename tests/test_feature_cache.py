"""The content-addressed feature cache: hits skip the backbone entirely; failures leave nothing."""

from __future__ import annotations

import numpy as np
import pytest

from tlops.artifacts import read_artifact
from tlops.features import extract as extract_mod
from tlops.steps import extract_features, ingest, pull_model


@pytest.fixture
def inputs(digits_cfg, tmp_path):
    cfg = digits_cfg()
    ds = ingest.run(cfg, {}, tmp_path / "ingest")
    model = pull_model.run(cfg, {}, tmp_path / "pull")
    return cfg, {"dataset": ds, "model": model}


def _arrays(art):
    with np.load(art.path / "features.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_second_extraction_runs_no_backbone_and_is_identical(inputs, tmp_path, monkeypatch, caplog):
    cfg, ins = inputs
    before = dict(extract_mod.STATS)
    first = extract_features.run(cfg, ins, tmp_path / "f1")
    forwards = extract_mod.STATS["backbone_batches"] - before["backbone_batches"]
    assert forwards > 0 and first.meta["cache"] == "miss"

    import tlops.models.bundle as bundle

    def no_model(*a, **k):
        raise AssertionError("backbone loaded on a cache hit")

    monkeypatch.setattr(bundle, "load_backbone", no_model)
    caplog.set_level("INFO")
    mark = dict(extract_mod.STATS)
    second = extract_features.run(cfg, ins, tmp_path / "f2")
    assert extract_mod.STATS == mark  # zero backbone forwards
    assert second.meta["cache"] == "hit"
    assert "cache hit" in caplog.text and "backbone not run" in caplog.text
    a, b = _arrays(first), _arrays(second)
    assert a.keys() == b.keys() == {"train", "val", "test"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert first.content_hash == second.content_hash == first.meta["cache_key"]


def test_key_changes_with_data(inputs, digits_cfg, tmp_path):
    cfg, ins = inputs
    first = extract_features.run(cfg, ins, tmp_path / "f1")
    other = digits_cfg(data={"classes": [0, 1, 3]})
    ds2 = ingest.run(other, {}, tmp_path / "ingest2")
    second = extract_features.run(cfg, {"dataset": ds2, "model": ins["model"]}, tmp_path / "f2")
    assert second.meta["cache"] == "miss" and second.meta["cache_key"] != first.meta["cache_key"]


def test_failed_extraction_leaves_no_cache_entry(inputs, tmp_path, monkeypatch):
    cfg, ins = inputs
    from tlops.steps.extract_features import cache_root

    calls = {"n": 0}
    real = extract_mod.extract

    def dies_on_second_split(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(extract_mod, "extract", dies_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        extract_features.run(cfg, ins, tmp_path / "f1")
    assert not (tmp_path / "f1").exists()
    root = cache_root(cfg)
    assert not root.exists() or not any(p.name == "manifest.json" for p in root.rglob("*"))
    monkeypatch.setattr(extract_mod, "extract", real)
    art = extract_features.run(cfg, ins, tmp_path / "f1")
    assert art.meta["cache"] == "miss"
    entry = root / art.meta["cache_key"][:2] / art.meta["cache_key"]
    assert read_artifact(entry, "feature-cache-entry").meta["cache_key"] == art.meta["cache_key"]
