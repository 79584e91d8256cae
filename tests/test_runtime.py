"""One training runtime: every strategy trains on the runtime's device and resumes from its
checkpoint dir; the device/precision knobs are config fields, not environment variables.

Placement is checked on the ``meta`` device, which works on any CPU: a runtime whose device is
``meta`` makes every loop move its model and batches there, and a forward pre-hook on every
module the loop prepared checks that the inputs and all the module's parameters and buffers are
on ``meta``, then stops the loop (a meta tensor has no data to train on). A loop that left its
model or a batch on the CPU fails the check. With a GPU, the same check runs whole trainings on
CUDA."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, SHARED_DATA, digits_config
from torch import nn

from tlops.config import TrainConfig, validate_config
from tlops.errors import TlopsError
from tlops.training import strategies as registry
from tlops.training.runtime import Runtime

SRC = REPO / "src" / "tlops"
IMAGE_MODEL = {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16}


# ------------------------------------------------------------------ the runtime comes from the config


def test_runtime_from_config_defaults_keep_todays_behaviour():
    cfg = TrainConfig()
    assert (cfg.device, cfg.precision, cfg.channels_last, cfg.compile) == ("auto", "fp32", False, False)
    rt = Runtime.from_config(cfg, checkpoint_dir=Path("/tmp/x"))
    assert rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert rt.checkpoint_dir == Path("/tmp/x") and (rt.rank, rt.world) == (0, 1) and not rt.distributed
    cpu = Runtime.from_config(TrainConfig(device="cpu", threads=3))
    assert cpu.device == torch.device("cpu") and cpu.threads == 3
    assert Runtime.from_config(TrainConfig(device="cpu")).threads >= 1  # unset: the usable CPUs
    ddp = Runtime.from_config(TrainConfig(device="cpu"), rank=1, world=2, local_rank=1, local_world=2)
    assert ddp.distributed and not ddp.is_main and ddp.threads >= 1
    with pytest.raises(Exception, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(Exception, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(TlopsError, match=r"train.device: cuda, but torch sees no CUDA device"):
        Runtime.from_config(TrainConfig(device="cuda"))


def test_bf16_autocast_and_cli_override(tmp_path):
    from tlops.config import load_config

    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(digits_config(tmp_path / "w")))
    sets = ["train.device=cpu", "train.precision=bf16", "train.channels_last=true", "train.compile=false"]
    cfg = load_config(path, sets)  # what `tlops run --set ...` (and bench/gpu.sh) passes
    rt = Runtime.from_config(cfg.train)
    assert (rt.device.type, rt.precision, rt.channels_last, rt.compile) == ("cpu", "bf16", True, False)
    with rt.autocast():
        y = nn.Linear(4, 2)(torch.randn(3, 4))
    assert y.dtype == torch.bfloat16


def _upper_constants(tree: ast.AST) -> set[str]:
    """Upper-case string constants (environment variable names look like this)."""
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isupper()
    }


def _touches_environment(tree: ast.AST) -> bool:
    names = {"environ", "getenv", "putenv"}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in names or isinstance(n, ast.Name) and n.id in names:
            return True
        if isinstance(n, ast.ImportFrom) and any(a.name in names for a in n.names):
            return True
    return False


def test_no_environment_variable_carries_training_state():
    """The old knobs (TLOPS_DEVICE, TLOPS_AMP, TLOPS_CHANNELS_LAST, TLOPS_COMPILE, TLOPS_NPROC,
    TLOPS_CHECKPOINT_DIR) are gone; training/ reads no environment; torchrun's own variables are
    read in one place, the torchrun runner, where the runtime is built."""
    gone = {"TLOPS_DEVICE", "TLOPS_AMP", "TLOPS_CHANNELS_LAST", "TLOPS_COMPILE", "TLOPS_NPROC", "TLOPS_CHECKPOINT_DIR"}
    torchrun_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    readers: dict[str, set[str]] = {}
    for p in SRC.rglob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        rel = p.relative_to(SRC).as_posix()
        assert not gone & _upper_constants(tree), rel
        if rel.startswith("training/"):
            assert not _touches_environment(tree), f"{rel} reads or writes the environment"
        for name in torchrun_vars & _upper_constants(tree):
            readers.setdefault(name, set()).add(rel)
    assert set(readers) == torchrun_vars and all(r == {"runners/torchrun.py"} for r in readers.values()), readers
    for p in [REPO / "bench" / "gpu.sh", *(REPO / "bench").glob("*.py")]:
        assert not any(g in p.read_text() for g in gone), p


# ------------------------------------------------------------------ every strategy on the runtime's device


class Reached(Exception):
    """A loop's first forward pass ran with everything on the meta device."""


class SpyRuntime(Runtime):
    """Records the device of every input and of every parameter/buffer at each forward of a
    module the loop prepared; on ``meta`` it stops the loop at the first forward."""

    def __init__(self, device: str, **kw: Any):
        super().__init__(device=torch.device(device), **kw)
        self.seen: list[tuple[str, set[str], set[str]]] = []

    def prepare(self, module: nn.Module) -> nn.Module:
        super().prepare(module)
        root = module

        def check(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            inputs = {str(t.device) for t in tensors}
            weights = {str(t.device) for t in (*root.parameters(), *root.buffers())}
            self.seen.append((type(mod).__name__, inputs, weights))
            if self.device.type == "meta":
                raise Reached(type(mod).__name__)

        for m in module.modules():
            m.register_forward_pre_hook(check, with_kwargs=True)
        return module


def _cells():
    for s in registry.REGISTRY.values():
        modality = "image" if "image" in s.modalities else "text"
        yield pytest.param(s.name, modality, id=s.name)


def _cfg(root: Path, name: str, modality: str, minilm: Path | None, **train: Any):
    s = registry.get(name)
    tsv = {"format": "tsv", "columns": ["text", "label"], "quoting": "none"}
    if modality == "image":
        source = {**IMAGE_MODEL, "candidates": ["timm:resnet10t"]} if s.needs_candidates else IMAGE_MODEL
        data: dict[str, Any] = {"source": "sklearn:digits", "classes": [0, 1, 2], "labels_per_class": 10}
        if s.needs_adapt_from:
            data = {
                "source": "sklearn:digits",
                "classes": [0, 1],
                "unlabelled": 0.5,
                "adapt_from": {"source": str(SHARED_DATA / "usps" / "usps.npz"), "max_samples": 120, "val": 0.25},
            }
    else:
        rows = (SHARED_DATA / "sentiment_labelled_sentences" / "yelp_labelled.txt").read_text().split("\n")
        rows = [r for lab in ("0", "1") for r in [r for r in rows if r.strip().endswith("\t" + lab)][:12]]
        (root / "yelp.tsv").write_text("\n".join(rows) + "\n")
        source = {"model": f"hf:{minilm}", "max_length": 16}
        data = {"source": str(root / "yelp.tsv"), **tsv, "labels_per_class": 4, "split": {"val": 0.25, "test": 0.25}}
    tr = {
        "strategies": [name],
        "threads": 1,  # cores shared with other processes: more threads only wait on each other
        "epochs": 2,
        "batch_size": 8,
        "augment": True,
        "lora": {"r": 2, "alpha": 4},
        "setfit": {"pairs_per_sample": 1, "batch_size": 8, "epochs": 2},
        "adapt": {"epochs": 2, "batch_size": 16},
        **train,
    }
    raw = digits_config(root / "work", data=data, source=source, train=tr)
    raw["data"] = data
    return validate_config(raw)


def _upstream(cfg, root: Path) -> dict:
    from tlops.steps import extract_features, ingest, pull_model

    ins = {"dataset": ingest.run(cfg, {}, root / "ingest"), "model": pull_model.run(cfg, {}, root / "pull")}
    ins["features"] = extract_features.run(cfg, ins, root / "features")
    return ins


@pytest.mark.parametrize("name, modality", list(_cells()))
def test_every_strategy_puts_its_model_and_batches_on_the_runtimes_device(name, modality, request, tmp_path):
    from tlops.steps import fine_tune

    minilm = request.getfixturevalue("minilm_dir") if modality == "text" else None
    s = registry.get(name)
    cfg = _cfg(tmp_path, name, modality, minilm, device="cpu")
    ins = _upstream(cfg, tmp_path)
    job = fine_tune.load_job(cfg, ins, Runtime.from_config(cfg.train))
    loops = []
    if s.uses_probe:  # the shared probe: scikit-learn on the cached features, on the CPU whatever the device
        job.runtime = SpyRuntime("meta")
        job.probe = fine_tune.probe(job)
        assert not job.runtime.seen and job.probe.head.weight.device.type == "cpu"
    job.runtime = SpyRuntime("meta")
    try:
        s.train(job, tmp_path / "out")
    except Reached:
        loops.append(job.runtime.seen)
    else:
        # head-only strategies fit the (scikit-learn) probe on cached features: no torch loop
        assert not s.trains_backbone and not job.runtime.seen
    assert loops or not s.trains_backbone, f"{name}: no training loop ran a forward pass"
    for seen in loops:
        assert len(seen) == 1
        _, inputs, weights = seen[0]
        assert inputs == {"meta"} and weights == {"meta"}, seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, modality", list(_cells()))
def test_every_strategy_trains_on_cuda(name, modality, request, tmp_path):
    from tlops.steps import fine_tune

    minilm = request.getfixturevalue("minilm_dir") if modality == "text" else None
    s = registry.get(name)
    cfg = _cfg(tmp_path, name, modality, minilm)
    ins = _upstream(cfg, tmp_path)
    job = fine_tune.load_job(cfg, ins, SpyRuntime("cuda"))
    if s.uses_probe:
        job.probe = fine_tune.probe(job)
    trained = s.train(job, tmp_path / "out")
    assert job.runtime.seen and all(i <= {"cuda:0"} and w == {"cuda:0"} for _, i, w in job.runtime.seen)
    assert all(p.device.type == "cpu" for p in trained.classifier.parameters())  # handed back on the CPU


# ------------------------------------------------------------------ every strategy resumes from the runtime's dir


# fine-tune's own loop is resumed in the default suite by test_resume (killed mid-run, through the runner's
# checkpoint dir, bit for bit); the others share the loop of a strategy resumed here
SAME_LOOP = {
    "fine-tune",
    "lora",
    "partial-fine-tune",
    "source-only",
    "coral",
    "mmd",
    "cdan",
    "adabn",
    "cdan-self-train",
}


def _resumable():
    for s in registry.REGISTRY.values():
        if not s.trains_backbone:
            continue  # no epoch loop to resume: the probe is recomputed (seconds)
        modality = "image" if "image" in s.modalities else "text"
        # the default suite resumes one strategy per training loop; the others share that loop
        # (lora and partial-fine-tune: fine-tune's; the adversarial/alignment losses and adabn:
        # _Stepper's, as dann; cdan-self-train: dann-self-train's) and run in the slow suite
        marks = [pytest.mark.slow] if s.name in SAME_LOOP else []
        yield pytest.param(s.name, modality, id=s.name, marks=marks)


@pytest.mark.parametrize("name, modality", list(_resumable()))
def test_every_strategy_resumes_from_the_runtimes_checkpoint_dir(
    name, modality, request, tmp_path, monkeypatch, caplog
):
    """Killed after epoch 1 of 2, the step resumes from ``<checkpoint dir>/<strategy>/`` and ends
    with the weights of an uninterrupted run."""
    from tlops.steps import fine_tune
    from tlops.training.checkpoints import Checkpoints

    minilm = request.getfixturevalue("minilm_dir") if modality == "text" else None
    cfg = _cfg(tmp_path, name, modality, minilm, device="cpu")
    ins = _upstream(cfg, tmp_path)
    ref = fine_tune.run(cfg, ins, tmp_path / "ref", checkpoint_dir=tmp_path / "ck-ref")

    real = Checkpoints.save

    def dies_after_epoch_1(self, epoch, state):
        real(self, epoch, state)
        if epoch == 1 and self.name == name:
            raise KeyboardInterrupt("killed")

    ck = tmp_path / "ck"
    monkeypatch.setattr(Checkpoints, "save", dies_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        fine_tune.run(cfg, ins, tmp_path / "ft", checkpoint_dir=ck)
    monkeypatch.setattr(Checkpoints, "save", real)
    assert [p.name for p in (ck / name).glob("epoch_*.pt")] == ["epoch_001.pt"]
    caplog.set_level(logging.INFO)
    caplog.clear()
    art = fine_tune.run(cfg, ins, tmp_path / "ft", checkpoint_dir=ck)
    assert f"{name}: resuming from epoch 1 of 2" in caplog.text
    got, want = art.meta["models"][name], ref.meta["models"][name]
    assert got["digest"] == want["digest"] and got["val_acc"] == want["val_acc"]
