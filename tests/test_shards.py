"""features.shards: sharded extraction is bit-identical to one pass, and a rerun recomputes only missing shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import digits_config
from tlops.features.cache import FeatureCache
from tlops.features.extract import batches_for, shard_rows
from tlops.steps import extract_features, ingest, pull_model


def _arrays(art):
    with np.load(art.path / "features.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_shard_rows_are_whole_batches_of_the_extraction_order():
    """Text rows are batched by length: each shard is a contiguous run of whole batches of that order."""
    x = [f"{'w ' * (i * 7 % 13)}{i}" for i in range(23)]

    class Text:
        modality = "text"

    whole = batches_for(Text(), x, 4)
    parts = [shard_rows("text", x, 4, i, 3) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))
    assert [rows[b].tolist() for rows in parts for b in batches_for(Text(), [x[i] for i in rows], 4)] == [
        b.tolist() for b in whole
    ]
    assert [len(p) for p in parts] == [8, 8, 7]  # 6 batches of 4 (the last one short), 2 per shard
    # more shards than batches: some are empty
    assert [len(shard_rows("image", np.zeros((3, 2)), 4, i, 2)) for i in range(2)] == [0, 3]


@pytest.fixture
def one_thread():
    """Both sides at one torch thread: oneDNN's CPU convolutions split their reductions by thread
    count, so features made with 1 and 2 threads differ in the last bits (~1e-7) whether sharded or
    not; the shard workers get ``threads // shards`` threads (here 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def setup(digits_cfg, tmp_path, one_thread):
    one = digits_cfg(features={"batch_size": 16})
    two = digits_cfg(features={"batch_size": 16, "shards": 2})
    ins = {"dataset": ingest.run(one, {}, tmp_path / "ingest"), "model": pull_model.run(one, {}, tmp_path / "pull")}
    art = extract_features.run(one, ins, tmp_path / "ref")
    ref = _arrays(art)
    cache = FeatureCache(extract_features.cache_root(one))
    shutil.rmtree(cache.entry(art.meta["cache_key"]))  # the sharded runs share the key: make them compute
    return one, two, ins, ref, cache, art.meta["cache_key"]


def _shard_key(cfg, ins, i):
    ds = extract_features.Dataset(ins["dataset"])
    chosen = {k: ins["model"].meta[k] for k in ("model_digest", "preprocessing")}
    job = extract_features._job(cfg, ds, ins["model"].path / "model", chosen, "torch")
    return extract_features._shard_job(job, i, cfg.features.shards)["key"]


def test_shard_tasks_then_merge_equal_one_pass(setup, tmp_path, caplog):
    """The KFP path in-process: each shard task writes its entry, extract-features only merges."""
    one, two, ins, ref, cache, key = setup
    caplog.set_level("INFO")
    assert extract_features.run_shard(two, ins, 0) is False
    assert extract_features.run_shard(two, ins, 1) is False
    assert extract_features.run_shard(two, ins, 1) is True  # a retried shard task: a cache hit
    merged = extract_features.run(two, ins, tmp_path / "merged")
    assert (merged.meta["shards_reused"], merged.meta["shards_computed"]) == ([0, 1], [])
    assert "worker processes" not in caplog.text  # nothing left to compute: no workers started
    got = _arrays(merged)
    assert set(got) == set(ref) and merged.meta["cache_key"] == key
    for split in ref:
        assert np.array_equal(got[split], ref[split]), split
    # a shard task after the merge finds the merged entry and does nothing
    shutil.rmtree(cache.entry(_shard_key(two, ins, 0)))
    caplog.clear()
    assert extract_features.run_shard(two, ins, 0) is True
    assert "merged features are cached already" in caplog.text and cache.get(_shard_key(two, ins, 0)) is None


@pytest.mark.slow
def test_worker_processes_bit_identical_and_rerun_computes_only_the_missing_shard(setup, tmp_path, caplog):
    """In-process: 2 spawned workers; after shard 1 is lost (its worker failed), a rerun reuses shard 0."""
    one, two, ins, ref, cache, key = setup
    caplog.set_level("INFO")
    first = extract_features.run(two, ins, tmp_path / "f2")
    assert first.meta["cache"] == "miss" and first.meta["shards"] == 2
    assert (first.meta["shards_reused"], first.meta["shards_computed"]) == ([], [0, 1])
    assert "in 2 worker processes (1 threads each)" in caplog.text
    for split in ref:
        assert np.array_equal(_arrays(first)[split], ref[split]), split

    shutil.rmtree(cache.entry(_shard_key(two, ins, 1)))
    shutil.rmtree(cache.entry(first.meta["cache_key"]))
    caplog.clear()
    again = extract_features.run(two, ins, tmp_path / "f3")
    assert (again.meta["shards_reused"], again.meta["shards_computed"]) == ([0], [1])
    assert "shard 0/2 reused" in caplog.text and "computing shards [1] of 2 in 1 worker processes" in caplog.text
    for split in ref:
        assert np.array_equal(_arrays(again)[split], ref[split]), split
    assert extract_features.run(two, ins, tmp_path / "f4").meta["cache"] == "hit"


def test_shard_task_beyond_the_configured_shards_does_nothing(digits_cfg, caplog):
    caplog.set_level("INFO")
    assert extract_features.run_shard(digits_cfg(features={"shards": 2}), {}, 2) is False
    assert "shard 2: nothing to do (features.shards: 2)" in caplog.text


def _compiled(tmp_path, monkeypatch, **features):
    from tlops.config import validate_config
    from tlops.kfp.pipeline import compile_pipeline

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    cfg = validate_config(digits_config(tmp_path / "w", features=features))
    return yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text())


def test_kfp_shards_compile_to_a_parallel_for_before_the_merge(tmp_path, monkeypatch):
    spec = next(_compiled(tmp_path, monkeypatch, shards=3, cache_dir="s3://features/cache"))
    tasks = spec["root"]["dag"]["tasks"]
    loops = [name for name, t in tasks.items() if "parameterIterator" in t]
    assert len(loops) == 1
    loop = tasks[loops[0]]
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2]
    assert set(loop["dependentTasks"]) == {"ingest", "pull-model"}
    assert loops[0] in tasks["extract-features"]["dependentTasks"]  # the merge waits for every shard
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["extract-features-shard"]
    assert inner["inputs"]["parameters"]["shard"]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    assert set(inner["inputs"]["artifacts"]) == {"dataset", "model"}
    assert inner["cachingOptions"] == {}  # KFP's cache off: one key for all shards would serve shard 0 thrice
    # (one shard: the plain DAG, checked by tests/test_kfp.py::test_compiled_dag_matches_the_library_dag)


@pytest.mark.parametrize(
    "features, named",
    [
        ({"shards": 2}, "cache_dir: (default: pod-local)"),
        ({"shards": 2, "cache_dir": "s3://b/f", "cache": False}, "cache: false"),
    ],
)
def test_kfp_shards_on_a_cluster_need_a_shared_cache(tmp_path, monkeypatch, features, named):
    from tlops.errors import ConfigError

    with pytest.raises(ConfigError, match="features.cache_dir: s3://") as e:
        next(_compiled(tmp_path, monkeypatch, **features))
    assert named in str(e.value)


@pytest.mark.slow
def test_kfp_local_shards_equal_in_process_one_shard(tmp_path):
    """kfp.local: two shard tasks (a ParallelFor) and the merging extract-features task, on a local
    cache; features bit-identical to an in-process one-shard extraction (each task, like this
    process, at torch's default thread count: see one_thread)."""
    from tlops.config import validate_config
    from tlops.kfp.pipeline import run_kfp_local

    cfg = validate_config(digits_config(tmp_path / "k", features={"shards": 2, "batch_size": 16}))
    kfp = run_kfp_local(cfg)
    feats = kfp.artifact("extract-features")
    assert feats.meta["shards"] == 2 and feats.meta["shards_reused"] == [0, 1] and feats.meta["shards_computed"] == []
    one = validate_config(digits_config(tmp_path / "p", features={"batch_size": 16}))
    ins = {"dataset": kfp.artifact("ingest"), "model": kfp.artifact("pull-model")}
    ref = extract_features.run(one, ins, tmp_path / "ref")
    assert ref.meta["cache"] == "miss" and ref.meta["cache_key"] == feats.meta["cache_key"]
    got, want = _arrays(feats), _arrays(ref)
    for split in want:
        assert np.array_equal(got[split], want[split]), split
