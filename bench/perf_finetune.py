"""Section 3 of bench/perf.py: fine-tuning, tlops ``fine_tune`` vs ``transformers.Trainer`` (MiniLM) and vs a
plain PyTorch loop (resnet10t): samples/s and time to a validation accuracy."""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from common import minilm_dir
from perf_setup import (
    CNN_BS,
    CNN_LR,
    CNN_TARGET_ACC,
    FT_BS,
    FT_LR,
    FT_MAXLEN,
    FT_TARGET_ACC,
    images,
    interleave_sides,
    med,
    sync_all,
    train_runtime,
    uci,
)

# =============================================================================== 3. fine-tuning


class EpochClock(logging.Handler):
    """Timestamps tlops fine_tune's per-epoch log lines (written after eval + checkpoint)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record):
        if " epoch " in record.getMessage():
            self.times.append(time.perf_counter())


@contextlib.contextmanager
def timed_method(cls, name: str):
    """Seconds spent in ``cls.name`` while the block runs (the list's one element)."""
    real, spent = getattr(cls, name), [0.0]

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    setattr(cls, name, timed)
    try:
        yield spent
    finally:
        setattr(cls, name, real)


def _tlops_ft(clf0, train, val, cfg, seed=0):
    """tlops.training.finetune.fine_tune on a copy of ``clf0``; per-epoch (seconds since start, val acc)."""
    from tlops.training.checkpoints import Checkpoints
    from tlops.training.common import seed_everything
    from tlops.training.finetune import fine_tune

    clf = copy.deepcopy(clf0)
    seed_everything(seed)  # as the fine-tune step does before each strategy (dropout draws from the global RNG)
    clock = EpochClock()
    lg = logging.getLogger("tlops.training.finetune")
    lg.addHandler(clock)
    old, prop = lg.level, lg.propagate
    lg.setLevel(logging.INFO)
    lg.propagate = False  # the clock sees the epoch lines; the console does not
    try:
        with tempfile.TemporaryDirectory(prefix="tlops-perf-ft-") as tmp, timed_method(Checkpoints, "save") as ck:
            t0 = time.perf_counter()
            hist = fine_tune(clf, train, val, cfg, seed, Path(tmp), frozen_k=0, name="perf")
            sync_all()
    finally:
        lg.removeHandler(clock)
        lg.setLevel(old)
        lg.propagate = prop
    curve = []  # (seconds since the call, val acc): step evaluations (train.eval_every), then the epoch's end
    steps = []  # (optimizer step, val acc) of the same evaluations
    per_epoch = -(-len(train) // cfg.batch_size)
    for t, h in zip(clock.times, hist, strict=False):
        curve += [(e["seconds"], e["val_acc"]) for e in h.get("evals", [])] + [(t - t0, h.get("val_acc"))]
        steps += [(e["step"], e["val_acc"]) for e in h.get("evals", [])] + [(h["epoch"] * per_epoch, h.get("val_acc"))]
    return {"curve": curve, "steps": steps, "final_acc": hist[-1].get("val_acc"), "checkpoint_s": ck[0]}


def _time_to(curve, target):
    for t, acc in curve:
        if acc is not None and acc >= target:
            return t
    return None


def trainer_ft(
    args,
    clf0,
    tok,
    train,
    val,
    epochs: int,
    pad: str | bool,
    sampling: str = "random",
    optim: str | None = None,
    eval_steps: int | None = None,
    seed: int = 0,
):
    """``transformers.Trainer`` fine-tuning the same Classifier; per-evaluation (seconds, val acc) and
    (optimizer step, val acc).

    ``eval_steps``: evaluate every N optimizer steps (then no best-model reload: the Trainer can only
    restore a best model it saved at every evaluation, and saving 90 MB each time is not its best setting)."""
    import numpy as np
    import torch.nn.functional as F
    from torch import nn
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    class Wrapped(nn.Module):  # the very same Classifier (backbone + mean pooling + linear head)
        def __init__(self, clf):
            super().__init__()
            self.clf = clf

        def forward(self, input_ids, attention_mask, labels=None, **_):
            logits = self.clf(input_ids=input_ids, attention_mask=attention_mask)
            out = {"logits": logits}
            if labels is not None:
                out = {"loss": F.cross_entropy(logits.float(), labels), "logits": logits}
            return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.curve, self.steps = [], []

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            sync_all()
            self.curve.append((time.perf_counter() - t0, metrics.get("eval_accuracy")))
            self.steps.append((state.global_step, metrics.get("eval_accuracy")))

    def acc(p):
        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

    t0 = time.perf_counter()
    model = Wrapped(copy.deepcopy(clf0))

    def encode(split):  # the tutorial: tokenize the whole dataset up front (Dataset.map)
        enc = tok(list(split.x), truncation=True, max_length=FT_MAXLEN, padding=pad)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": int(split.y[i]),
            }
            for i in range(len(split))
        ]

    with tempfile.TemporaryDirectory(prefix="tlops-perf-trainer-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=FT_BS,
            per_device_eval_batch_size=2 * FT_BS,
            num_train_epochs=epochs,
            learning_rate=FT_LR,
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_grad_norm=0.0,
            eval_strategy="steps" if eval_steps else "epoch",
            eval_steps=eval_steps,
            logging_strategy="no",
            report_to="none",
            # like tlops: a checkpoint every epoch and (epoch evaluation) the best epoch's weights at the end
            save_strategy="epoch",
            save_total_limit=2,
            load_best_model_at_end=not eval_steps,
            metric_for_best_model="accuracy",
            seed=seed,
            use_cpu=args.device == "cpu",
            disable_tqdm=True,
            bf16=args.amp == "bf16",
            torch_compile=args.compile,
            train_sampling_strategy=sampling,
            **({"optim": optim} if optim else {}),  # None: the Trainer's default
        )
        clock = Clock()
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=encode(train),
            eval_dataset=encode(val),
            data_collator=DataCollatorWithPadding(tok) if pad is False else default_data_collator,
            compute_metrics=acc,
            callbacks=[clock],
        )
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        with timed_method(Trainer, "_save_checkpoint") as ck:
            trainer.train()
        sync_all()
    final = clock.curve[-1][1] if clock.curve else None
    return {"curve": clock.curve, "steps": clock.steps, "final_acc": final, "checkpoint_s": ck[0]}


def bench_finetune(args, sz) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tlops.config import TrainConfig
    from tlops.data.dataset import Split
    from tlops.models.backbone import ImageBackbone, TextBackbone
    from tlops.models.bundle import Classifier
    from tlops.training import finetune

    res: dict[str, Any] = {}
    # ------------------------------------------------------------------ text: tlops vs transformers.Trainer
    x, y = uci(("yelp",))
    ntr, nva = sz["ft_train"], sz["ft_val"]
    train, val = Split(x[:ntr], np.array(y[:ntr])), Split(x[ntr : ntr + nva], np.array(y[ntr : ntr + nva]))
    torch.manual_seed(0)
    tb = TextBackbone.create(str(minilm_dir()), max_length=FT_MAXLEN, pooling="mean")
    clf0 = Classifier(tb, 2, ["0", "1"])
    tok = tb.tokenizer
    epochs = sz["ft_epochs"]
    tcfg = TrainConfig(
        strategies=["fine-tune"],
        epochs=epochs,
        batch_size=FT_BS,
        lr=FT_LR,
        head_lr=FT_LR,
        weight_decay=0.0,
        **train_runtime(args),
    )

    import transformers

    transformers.utils.logging.set_verbosity_error()
    sides = {
        "tlops fine_tune": lambda: _tlops_ft(clf0, train, val, tcfg),
        "Trainer, dynamic padding (default collator)": lambda: trainer_ft(args, clf0, tok, train, val, epochs, False),
        f"Trainer, pad to max_length={FT_MAXLEN} (tutorial)": lambda: trainer_ft(
            args, clf0, tok, train, val, epochs, "max_length"
        ),
    }
    label = f"finetune text: MiniLM-L6 yelp {ntr} train / {nva} val, {epochs} epoch(s), bs {FT_BS}, max_len {FT_MAXLEN}"
    print(f"[finetune] {label}", flush=True)
    r = interleave_sides("finetune-text", sides, args.repeats, ntr * epochs)
    res["text"] = _ft_summary(label, r, ntr * epochs, FT_TARGET_ACC, "tlops fine_tune")
    if args.ablation:  # where the speed comes from: one change at a time, its own interleaved series

        def no_grouping():
            grouped = finetune.epoch_batches
            finetune.epoch_batches = lambda *a, **kw: grouped(*a, **{**kw, "bucket": False})  # permutation slices
            try:
                return _tlops_ft(clf0, train, val, tcfg)
            finally:
                finetune.epoch_batches = grouped

        abl = {
            "tlops fine_tune": sides["tlops fine_tune"],
            "tlops without length grouping": no_grouping,
            "tlops, train.threads=1": lambda: _tlops_ft(clf0, train, val, tcfg.model_copy(update={"threads": 1})),
            "Trainer, group_by_length": lambda: trainer_ft(
                args, clf0, tok, train, val, epochs, False, "group_by_length"
            ),
        }
        print(f"[finetune] ablation: {label}", flush=True)
        r = interleave_sides("finetune-textablation", abl, max(2, args.repeats - 1), ntr * epochs)
        res["text_ablation"] = _ft_summary("ablation: " + label, r, ntr * epochs, FT_TARGET_ACC, "tlops fine_tune")

    # ------------------------------------------------------------------ CNN: tlops vs a plain PyTorch loop
    xi, yi = images("usps")
    ntr, nva = sz["cnn_train"], sz["cnn_val"]
    ctrain, cval = Split(xi[:ntr], yi[:ntr]), Split(xi[ntr : ntr + nva], yi[ntr : ntr + nva])
    torch.manual_seed(0)
    ib = ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=32)
    cclf0 = Classifier(ib, 10)
    epochs = sz["cnn_epochs"]
    ccfg = TrainConfig(
        strategies=["fine-tune"],
        epochs=epochs,
        batch_size=CNN_BS,
        lr=CNN_LR,
        head_lr=CNN_LR,
        weight_decay=0.0,
        **train_runtime(args),
    )
    dev = torch.device(args.device)

    def plain_loop():
        from torch.utils.data import DataLoader, TensorDataset

        t0 = time.perf_counter()
        clf = copy.deepcopy(cclf0)
        mean, std = ib.preprocessing["mean"][0], ib.preprocessing["std"][0]
        model = nn.Sequential(clf.backbone.model, clf.head).to(dev)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)

        def tensors(s):  # the whole split preprocessed once: ToTensor + Resize + Normalize
            t = torch.from_numpy(s.x).float().div(255.0).unsqueeze(1)
            t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
            return TensorDataset((t - mean) / std, torch.from_numpy(s.y))

        g = torch.Generator().manual_seed(0)
        dl = DataLoader(tensors(ctrain), batch_size=CNN_BS, shuffle=True, generator=g, pin_memory=dev.type == "cuda")
        vl = DataLoader(tensors(cval), batch_size=2 * CNN_BS, pin_memory=dev.type == "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=CNN_LR, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(dl))
        curve = []
        for _ in range(epochs):
            model.train()
            tot, correct = 0.0, 0
            for xb, yb in dl:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                if args.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                opt.zero_grad()
                ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
                with ctx:
                    out = model(xb)
                loss = F.cross_entropy(out.float(), yb)
                loss.backward()
                opt.step()
                sched.step()
                tot += loss.item() * len(yb)
                correct += (out.argmax(1) == yb).sum().item()
            model.eval()
            hits = 0
            with torch.no_grad():
                for xb, yb in vl:
                    hits += (model(xb.to(dev)).argmax(1).cpu() == yb).sum().item()
            curve.append((time.perf_counter() - t0, hits / len(cval)))
        return {"curve": curve, "final_acc": curve[-1][1]}

    label = f"finetune CNN: resnet10t 32x32 USPS {ntr} train / {nva} val, {epochs} epoch(s), bs {CNN_BS}"
    print(f"[finetune] {label}", flush=True)
    csides = {"tlops fine_tune": lambda: _tlops_ft(cclf0, ctrain, cval, ccfg), "plain PyTorch loop": plain_loop}
    if args.ablation:
        csides["tlops, train.threads=1"] = lambda: _tlops_ft(
            cclf0, ctrain, cval, ccfg.model_copy(update={"threads": 1})
        )
    r = interleave_sides("finetune-cnn", csides, args.repeats, ntr * epochs)
    res["cnn"] = _ft_summary(label, r, ntr * epochs, CNN_TARGET_ACC, "tlops fine_tune")
    return res


def _ft_summary(label, r, n_samples, target, ours) -> dict[str, Any]:
    sides = {}
    for name, secs in r["secs"].items():
        outs = r["outs"][name]
        tta = [_time_to(o["curve"], target) for o in outs]
        reached = [t for t in tta if t is not None]
        sides[name] = {
            "secs": secs,
            "samples_s": n_samples / med(secs),
            "cpu_seconds": r["cpu"][name],
            "final_acc": [o["final_acc"] for o in outs],
            "checkpoint_s": [o.get("checkpoint_s") for o in outs],
            "curves": [o["curve"] for o in outs],
            "time_to_target": med(reached) if len(reached) == len(tta) else None,
            "reached_target": f"{len(reached)}/{len(tta)}",
        }
    for name, s in sides.items():
        s["speedup"] = (sides[ours]["samples_s"] / s["samples_s"]) if name != ours else 1.0
        if name != ours and s["time_to_target"] and sides[ours]["time_to_target"]:
            s["tta_speedup"] = s["time_to_target"] / sides[ours]["time_to_target"]
    for name, s in sides.items():
        print(
            f"  -> {name}: {s['samples_s']:.1f} samples/s, tlops speedup {s['speedup']:.2f}x, "
            f"final val acc {s['final_acc']}, time to {target:.2f}: {s['time_to_target']}",
            flush=True,
        )
        for o in r["outs"][name]:
            o.clear()
    return {"workload": label, "n_samples": n_samples, "target_acc": target, "sides": sides}
