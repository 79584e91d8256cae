"""Every runner lists strategies in config order: a step that reads its inputs from disk (compose,
`tlops step`, KFP) sees the same order as the in-process runner, so the summary tables agree."""

from __future__ import annotations

import pytest

from tlops.artifacts import read_artifact, write_artifact
from tlops.dag import DAG
from tlops.report import load_result, summary_rows
from tlops.runners.local import run_pipeline
from tlops.runners.step_io import run_step

STRATEGIES = ["linear-probe", "fine-tune"]  # not alphabetical


def _table(result) -> list[tuple]:
    return [(r["strategy"], r["accuracy"], r["gain"]) for r in summary_rows(result)]  # train seconds vary


def test_a_manifest_read_from_disk_keeps_the_writers_key_order(tmp_path):
    with write_artifact(tmp_path / "a", "trained-models") as w:
        w.metadata = {"selected": "linear-probe", "models": {s: {"val_acc": 0.5} for s in [*STRATEGIES, "scratch"]}}
    assert list(read_artifact(tmp_path / "a").meta["models"]) == list(w.manifest["metadata"]["models"])
    assert list(read_artifact(tmp_path / "a").meta["models"]) == [*STRATEGIES, "scratch"]


@pytest.mark.slow  # two full pipelines with fine-tuning: about a minute on 2 busy cores
def test_step_chain_from_disk_lists_strategies_in_config_order_like_in_process(digits_cfg, tmp_path):
    cfg = digits_cfg(train={"strategies": STRATEGIES, "epochs": 1}, evaluate={"scratch_baseline": True})
    in_process = run_pipeline(cfg, reuse=False)

    # compose / `tlops step`: each step in turn, its inputs read back from the producers' dirs
    chain_cfg = cfg.model_copy(update={"workdir": str(tmp_path / "chain-work")})
    run_dir = tmp_path / "chain" / "run"
    for spec in DAG:
        ins = {name: str(run_dir / producer) for name, producer in spec.inputs.items()}
        run_step(spec, chain_cfg, ins, str(run_dir / spec.name), reuse=False)
    chain = load_result(run_dir)

    assert [r["strategy"].rstrip(" *") for r in summary_rows(in_process)] == [*STRATEGIES, "scratch"]
    assert _table(chain) == _table(in_process)
    assert list(chain.artifact("fine-tune").meta["models"]) == [*STRATEGIES, "scratch"]
