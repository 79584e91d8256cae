"""The text / few-shot / stacking / selection benchmark (bench/transfer_text.py): the ensemble helper it
uses, and (slow) a --quick rerun that must reproduce the committed quick results within tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tlops.errors import ConfigError
from tlops.models.ensemble import ProbaEnsemble, average_proba

REPO = Path(__file__).resolve().parents[1]
QUICK_TOLERANCE = 0.04  # absolute accuracy; same code, data, seed and thread count -> usually identical


def test_average_proba_is_a_weighted_mean_and_checks_its_inputs():
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    b = np.array([[0.5, 0.5], [0.6, 0.4]])
    assert np.allclose(average_proba([a, b]), (a + b) / 2)
    assert np.allclose(average_proba([a, b], weights=[3, 1]), 0.75 * a + 0.25 * b)
    with pytest.raises(ConfigError, match="one shape"):
        average_proba([a, b[:1]])
    with pytest.raises(ConfigError, match="non-negative weights"):
        average_proba([a, b], weights=[1, -1])


class _Fixed:
    def __init__(self, p, classes=("neg", "pos")):
        self.p, self.classes = np.asarray(p, dtype=np.float32), list(classes)

    def predict_proba(self, x, batch_size=64):
        return self.p[: len(x)]


def test_proba_ensemble_averages_members_and_rejects_mismatched_classes():
    ens = ProbaEnsemble([_Fixed([[0.9, 0.1], [0.4, 0.6]]), _Fixed([[0.3, 0.7], [0.2, 0.8]])])
    assert ens.classes == ["neg", "pos"]
    assert np.allclose(ens.predict_proba([0, 1]), [[0.6, 0.4], [0.3, 0.7]])
    assert ens.predict([0, 1]).tolist() == [0, 1]
    with pytest.raises(ConfigError, match="different classes"):
        ProbaEnsemble([_Fixed([[1, 0]]), _Fixed([[1, 0]], classes=("a", "b"))])


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quick_text_benchmark_reproduces_the_committed_results(shared_data, minilm_dir, tmp_path):
    committed = json.loads((REPO / "bench" / "results" / "transfer-text-quick.json").read_text())
    out = tmp_path / "transfer-text-quick.md"
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "transfer_text.py"), "--quick", "--out", str(out)],
        check=True,
        cwd=REPO,
        env={**os.environ, "TLOPS_SHARED_DATA": str(shared_data)},
    )
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["hyperparameters"] == committed["hyperparameters"] and got["seeds"] == committed["seeds"]
    assert got["settings"].keys() == committed["settings"].keys()
    for setting, ref in committed["settings"].items():
        new = got["settings"][setting]
        assert new["sizes"] == ref["sizes"], setting
        assert new["summary"].keys() == ref["summary"].keys()
        for task, per in ref["summary"].items():
            assert per.keys() == new["summary"][task].keys(), f"{setting} {task}"
            for method, r in per.items():
                acc = new["summary"][task][method]["acc_mean"]
                assert acc == pytest.approx(r["acc_mean"], abs=QUICK_TOLERANCE), (
                    f"{setting} {task} {method}: {acc:.3f} vs committed {r['acc_mean']:.3f}"
                )
    sel_ref, sel_new = committed["settings"]["digits"]["selection"], got["settings"]["digits"]["selection"]
    for a, b in zip(sel_ref, sel_new, strict=True):
        for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
            assert ca["source"] == cb["source"] and cb["score"] == pytest.approx(ca["score"], abs=0.05)
    text = out.read_text()
    for needle in ("model selection: source validation only", "Negative transfer", "Spearman", "stacked"):
        assert needle in text


def test_top_layers_on_cached_states_reproduce_the_backbones_embeddings(minilm_dir):
    """The benchmark trains the encoder's top layers on cached token states; the pooled output of those
    layers must be what the tlops backbone gives (its mean pooling and L2 normalisation included), or
    every top-layer row of the text benchmark measures a different model."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import torch
        from transfer_text_encoder import _PRISTINE, Encoded, HiddenStore, TopLayers, _check_cache
    finally:
        sys.path.remove(str(REPO / "bench"))
    texts = ["Great phone, works well.", "Terrible.", "The battery died after a week of light use, sadly."] * 4
    enc = Encoded(texts, np.array([1, 0, 0] * 4), max_length=32, top_layers=1, batch_size=5)
    store = HiddenStore({"uci": enc})
    top = TopLayers(_PRISTINE[32], 1).eval()
    assert top.l2 and _PRISTINE[32].preprocessing["normalize"] == "l2"  # MiniLM's own pipeline normalises
    with torch.no_grad():
        got = top(**store.prepare(store.ids("uci", np.arange(len(texts))))).numpy()
    np.testing.assert_allclose(got, enc.features, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    _check_cache(store, {"uci": enc}, 32, 1)  # the benchmark's own check passes
