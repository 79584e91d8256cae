"""The strategy registry: one list that config validation, the fine-tune step, `tlops strategies`
and the docs read, and a matrix that runs every strategy on an image and a text source model,
with and without `data.adapt_from`, on tiny real data. Each combination either trains a usable
classifier or is refused by validation with a message naming the strategy and what is missing;
nothing raises anything else.

The expensive half (text models trained with a strategy that is not text-only) is marked slow;
every strategy keeps at least one trained combination in the default suite."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import SHARED_DATA, digits_config

from tlops.config import STRATEGIES, TrainConfig, validate_config
from tlops.errors import ConfigError
from tlops.training import strategies as registry

IMAGE_MODEL = {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16}


# ------------------------------------------------------------------ the registry is the one list


def test_config_cli_and_docs_read_the_registry(monkeypatch, capsys):
    names = registry.names()
    assert STRATEGIES == names
    (allowed,) = typing.get_args(TrainConfig.model_fields["strategies"].annotation)
    assert typing.get_args(allowed) == names
    modules = [m.name for m in pkgutil.iter_modules(registry.__path__) if not m.name.startswith("_")]
    declared = {importlib.import_module(f"tlops.training.strategies.{m}").STRATEGY.name for m in modules if m != "base"}
    assert declared == set(names), "every strategy module registers one strategy, and nothing else does"
    from tlops.cli import main

    monkeypatch.setattr(sys, "argv", ["tlops", "strategies"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(names)
    for ln, s in zip(lines, registry.REGISTRY.values(), strict=True):
        assert s.summary in ln and ("needs: " + (", ".join(s.needs()) or "-")) in ln


def test_importing_the_registry_and_validating_a_config_import_no_torch(tmp_path):
    import subprocess

    code = (
        "import sys; from tlops.config import validate_config; from tlops.training import strategies;"
        f"validate_config({digits_config(tmp_path)!r}); assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------ tiny data per (modality, adapt_from)


def _tiny_text(path: Path, name: str, per_class: int) -> Path:
    rows = [
        ln.rsplit("\t", 1)
        for ln in (SHARED_DATA / "sentiment_labelled_sentences" / name).read_text(encoding="utf-8").split("\n")
        if ln.strip()
    ]
    keep = [r for lab in ("0", "1") for r in [r for r in rows if r[1].strip() == lab][:per_class]]
    path.write_text("".join(f"{t}\t{lab.strip()}\n" for t, lab in keep), encoding="utf-8")
    return path


def _tiny_mnist(path: Path) -> Path:
    with np.load(SHARED_DATA / "mnist" / "mnist_subset.npz", allow_pickle=False) as z:
        x, y = z["x_test"], z["y_test"]
    idx = np.concatenate([np.flatnonzero(y == c)[:80] for c in (0, 1)])
    np.savez(path, x=x[idx], y=y[idx])
    return path


def _raw(root: Path, modality: str, adapt: bool, strategies: list[str], minilm: Path | None) -> dict[str, Any]:
    """A config for one matrix cell; ``source.candidates`` is set (so stacking can train)."""
    tsv = {"format": "tsv", "columns": ["text", "label"], "quoting": "none"}
    if modality == "image":
        source = {**IMAGE_MODEL, "candidates": ["timm:resnet10t"]}
        data: dict[str, Any] = {"source": "sklearn:digits", "classes": [0, 1, 2], "labels_per_class": 10}
        if adapt:
            data = {
                "source": str(_tiny_mnist(root / "mnist01.npz")),
                "classes": [0, 1],
                "labels_per_class": None,
                "split": {"val": 0.2, "test": 0.2},
                "unlabelled": 0.8,
                "adapt_from": {"source": str(SHARED_DATA / "usps" / "usps.npz"), "max_samples": 80, "val": 0.25},
            }
    else:
        assert minilm is not None
        source = {"model": f"hf:{minilm}", "max_length": 16, "candidates": [f"hf:{minilm}"]}
        data = {"source": str(_tiny_text(root / "yelp.tsv", "yelp_labelled.txt", 20)), **tsv}
        data |= {"split": {"val": 0.2, "test": 0.2}, "labels_per_class": 4}
        if adapt:
            amazon = _tiny_text(root / "amazon.tsv", "amazon_cells_labelled.txt", 16)
            data |= {
                "labels_per_class": None,
                "unlabelled": 0.5,
                "adapt_from": {"source": str(amazon), **tsv, "val": 0.25},
            }
    raw = digits_config(
        root / "work",
        data=data,
        source=source,
        train={
            "strategies": strategies,
            "epochs": 1,
            "batch_size": 8,
            "lora": {"r": 2, "alpha": 4},
            "setfit": {"pairs_per_sample": 1, "batch_size": 8},
            "adapt": {"epochs": 1, "batch_size": 8},
        },
    )
    raw["data"] = data  # not merged with the digits defaults
    return raw


CELLS = [(m, a) for m in ("image", "text") for a in (False, True)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """ingest, pull-model and extract-features once per (modality, adapt_from) cell."""
    from tlops.steps import extract_features, ingest, pull_model

    made: dict[tuple[str, bool], tuple[Path, dict]] = {}

    def get(modality: str, adapt: bool, minilm: Path | None):
        if (modality, adapt) not in made:
            root = tmp_path_factory.mktemp(f"{modality}-{'adapt' if adapt else 'plain'}")
            cfg = validate_config(_raw(root, modality, adapt, ["stacking"], minilm))  # stacking: stacked features too
            ins = {"dataset": ingest.run(cfg, {}, root / "ingest"), "model": pull_model.run(cfg, {}, root / "pull")}
            ins["features"] = extract_features.run(cfg, ins, root / "features")
            made[modality, adapt] = (root, ins)
        return made[modality, adapt]

    return get


def _expected_refusal(s: registry.Strategy, modality: str, adapt: bool, model: str) -> list[str]:
    out = []
    if s.needs_adapt_from and not adapt:
        out.append(f"train.strategies: {s.name} needs data.adapt_from (labelled source-domain data)")
    if modality not in s.modalities:
        want = " or ".join(
            {"image": "an image model (timm:...)", "text": "a text model (hf:...)"}[m] for m in s.modalities
        )
        out.append(f"train.strategies: {s.name} needs {want}, but source.model {model} is an {modality} model; ")
    return out


def _matrix_params():
    for name in registry.names():
        s = registry.get(name)
        for modality, adapt in CELLS:
            refused = (s.needs_adapt_from and not adapt) or modality not in s.modalities
            # text models are the slow half; text-only strategies keep their plain text run in the default suite
            slow = not refused and modality == "text" and (adapt or "image" in s.modalities)
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(
                name, modality, adapt, id=f"{name}-{modality}-{'adapt' if adapt else 'plain'}", marks=marks
            )


@pytest.mark.parametrize("name, modality, adapt", list(_matrix_params()))
def test_every_strategy_trains_or_is_refused_precisely(name, modality, adapt, upstream, request, tmp_path):
    from tlops.data.dataset import Dataset
    from tlops.models.bundle import load_classifier
    from tlops.steps import fine_tune

    s = registry.get(name)
    minilm = request.getfixturevalue("minilm_dir") if modality == "text" else None
    raw = _raw(tmp_path, modality, adapt, [name], minilm)
    expected = _expected_refusal(s, modality, adapt, raw["source"]["model"])
    if expected:
        with pytest.raises(ConfigError) as e:
            validate_config(raw)
        msg = str(e.value)
        for line in expected:
            assert line in msg, msg
        if modality not in s.modalities:  # and it names what would fit
            assert f"strategies for {modality} models: {', '.join(registry.for_modality(modality))}" in msg
        return
    cfg = validate_config(raw)
    _, ins = upstream(modality, adapt, minilm)
    art = fine_tune.run(cfg, ins, tmp_path / "ft")
    rec = art.meta["models"][name]
    assert art.meta["selected"] == name and rec["epochs"] >= 1 and len(rec["digest"]) == 64
    assert rec["val_acc"] is not None and 0.0 <= rec["val_acc"] <= 1.0
    if adapt:
        assert 0.0 <= rec["source_val_acc"] <= 1.0
    x = Dataset(ins["dataset"]).load("test").x[:3]  # the bundle serves predictions on raw inputs
    probs = load_classifier(art.path / "models" / name).predict_proba(x)
    assert probs.shape[0] == 3 and np.allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", [s.name for s in registry.REGISTRY.values() if s.needs_candidates])
def test_a_strategy_that_needs_candidates_is_refused_without_them(name, tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_config(digits_config(tmp_path, source=IMAGE_MODEL, train={"strategies": [name]}))
    assert f"train.strategies: {name} needs source.candidates" in str(e.value)


def test_tlops_validate_prints_the_refusal_without_a_traceback(monkeypatch, capsys, tmp_path):
    from tlops.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(digits_config(tmp_path / "work", train={"strategies": ["linear-probe", "setfit", "dann"]}))
    )
    monkeypatch.setattr(sys, "argv", ["tlops", "validate", "--config", str(cfg)])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and "Traceback" not in err
    assert "train.strategies: dann needs data.adapt_from (labelled source-domain data)" in err
    assert (
        "train.strategies: setfit needs a text model (hf:...), but source.model timm:resnet10t is an image model" in err
    )


def test_modality_known_only_after_pull_model_is_checked_before_any_training(digits_cfg, tmp_path, caplog):
    """A bundle directory (or an MLflow model) does not say its modality in the config: the
    fine-tune step refuses the strategy from the pulled model, before the probe or any training."""
    from tlops.steps import extract_features, fine_tune, ingest, pull_model

    up = digits_cfg()
    bundle = pull_model.run(up, {}, tmp_path / "pull").path / "model"
    cfg = digits_cfg(source={"model": str(bundle)}, train={"strategies": ["linear-probe", "setfit"]})  # validates
    ins = {"dataset": ingest.run(cfg, {}, tmp_path / "ingest"), "model": pull_model.run(cfg, {}, tmp_path / "pull2")}
    ins["features"] = extract_features.run(cfg, ins, tmp_path / "features")
    caplog.set_level("INFO")
    with pytest.raises(ConfigError) as e:
        fine_tune.run(cfg, ins, tmp_path / "ft")
    assert str(e.value).startswith(
        f"train.strategies: setfit needs a text model (hf:...), but the source model {bundle} is an image model; "
        "strategies for image models: linear-probe, "
    )
    assert not (tmp_path / "ft").exists() and "linear-probe: early stop" not in caplog.text
