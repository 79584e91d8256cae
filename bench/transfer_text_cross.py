"""Setting 1 of bench/transfer_text.py: cross-domain sentiment (UCI, Blitzer) with a frozen probe, full
fine-tuning, LoRA, and top-layer training with and without CORAL / DANN."""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import epoch_printer, rounded_history, timed
from torch import nn
from transfer_text_encoder import (
    _PRISTINE,
    Encoded,
    HiddenStore,
    TopLayers,
    TopModel,
    _check_cache,
    clf_acc,
    head_acc,
    minilm,
)
from transfer_text_setup import ARROW, Progress, load_blitzer, load_uci

from tlops.config import LoraConfig, TrainConfig
from tlops.data.dataset import Split
from tlops.models.bundle import Classifier
from tlops.training import adaptation as da
from tlops.training.finetune import fine_tune
from tlops.training.lora import apply_lora, merge_lora
from tlops.training.probe import train_probe

# --------------------------------------------------------------------------- settings 1: cross-domain


def run_cross(
    setting: str,
    pairs: list[str],
    seeds: list[int],
    methods: list[str],
    hp: dict[str, Any],
    limit: int | None,
    verbose: bool,
    progress: Progress,
    threads: int,
) -> dict[str, Any]:
    """Every pair x seed x method; finished results go to ``progress`` at once. ``threads``: for fine_tune."""
    max_len = hp["uci_max_length"] if setting == "uci" else hp["blitzer_max_length"]
    top_k = hp["top_layers"] if setting == "uci" else hp["blitzer_top_layers"]
    domains = sorted({d for p in pairs for d in p.split("-")})
    enc: dict[str, Encoded] = {}
    embed_secs: dict[str, float] = {}
    for d in domains:
        texts, y = load_uci(d) if setting == "uci" else load_blitzer(d, hp["blitzer_n"])
        if limit:
            sel = np.sort(np.random.default_rng(99).permutation(len(y))[:limit])
            texts, y = [texts[i] for i in sel], y[sel]
        enc[d] = Encoded(texts, y, max_len, top_k)
        embed_secs[d] = enc[d].seconds
        print(
            f"[{setting}] encoded {d}: {len(y)} texts in {enc[d].seconds:.0f}s "
            f"(mean {enc[d].lengths.mean():.1f} tokens, {int((enc[d].lengths >= max_len).sum())} truncated at "
            f"{max_len})",
            flush=True,
        )
    store = HiddenStore(enc)
    _check_cache(store, enc, max_len, top_k)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    val_frac = hp["source_val_frac"] if setting == "uci" else hp["blitzer_val_frac"]
    errors: list[dict[str, Any]] = []
    for pair in pairs:
        src, tgt = pair.split("-")
        runs[pair] = {m: [] for m in methods}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            sp, tp = rng.permutation(len(enc[src].y)), rng.permutation(len(enc[tgt].y))
            n_val = int(round(len(sp) * val_frac))
            s_val, s_tr = sp[:n_val], sp[n_val:]
            half = len(tp) // 2
            t_un, t_te = tp[:half], tp[half:]
            sizes[pair] = {
                "source": len(s_tr),
                "source_val": len(s_val),
                "target_unlabelled": len(t_un),
                "target_test": len(t_te),
            }
            S, T = enc[src], enc[tgt]
            ctx = {
                "S": S,
                "T": T,
                "s_tr": s_tr,
                "s_val": s_val,
                "t_un": t_un,
                "t_te": t_te,
                "store": store,
                "src": src,
                "tgt": tgt,
                "seed": seed,
                "hp": hp,
                "setting": setting,
                "verbose": verbose,
                "threads": threads,
            }
            (p_head, _), p_dt, p_other, p_cpu = timed(
                train_probe, S.features[s_tr], S.y[s_tr], S.features[s_val], S.y[s_val], 2, TrainConfig(), seed
            )
            ctx["probe_head"] = p_head
            for method in methods:
                done = progress.get(setting, pair, method, seed)
                if done is not None:
                    runs[pair][method].append(done)
                    print(
                        f"[{setting}] {ARROW[pair]} seed {seed} {method:12s} acc {done['acc'] * 100:5.1f} (from the "
                        "partial file)",
                        flush=True,
                    )
                    continue
                try:
                    if method == "frozen-probe":
                        res = {
                            "acc": head_acc(p_head, T.features[t_te], T.y[t_te]),
                            "seconds": p_dt,
                            "other_cpu": p_other,
                            "cpu_seconds": p_cpu,
                            "source_val_acc": head_acc(p_head, S.features[s_val], S.y[s_val]),
                        }
                    elif method in ("fine-tune", "lora"):
                        res = _run_full(method, ctx)
                    else:
                        res = _run_top(method, ctx)
                except Exception as e:  # keep the other methods' results; the report lists the failure
                    traceback.print_exc()
                    errors.append({"task": pair, "method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                    continue
                res["seed"] = seed
                runs[pair][method].append(res)
                progress.put(res, setting, pair, method, seed)
                print(
                    f"[{setting}] {ARROW[pair]} seed {seed} {method:12s} acc {res['acc'] * 100:5.1f}  "
                    f"src-val {res.get('source_val_acc', float('nan')) * 100:5.1f}  {res['seconds']:6.1f}s "
                    f"[{res['cpu_seconds']:.0f} CPU s] "
                    f"(other procs {0 if res['other_cpu'] is None else res['other_cpu'] * 100:.0f}% CPU)",
                    flush=True,
                )
    return {
        "tasks": runs,
        "sizes": sizes,
        "embed_seconds": embed_secs,
        "max_length": max_len,
        "errors": errors,
        "mean_tokens": {d: float(e.lengths.mean()) for d, e in enc.items()},
        "truncated": {d: int((e.lengths >= max_len).sum()) for d, e in enc.items()},
        "n_per_domain": {d: len(e.y) for d, e in enc.items()},
    }


def _run_full(method: str, ctx: dict[str, Any]) -> dict[str, Any]:
    hp, S, T, seed = ctx["hp"], ctx["S"], ctx["T"], ctx["seed"]
    max_len = hp["uci_max_length"] if ctx["setting"] == "uci" else hp["blitzer_max_length"]
    s_tr = ctx["s_tr"]
    if ctx["setting"] == "blitzer" and hp["blitzer_ft_source"]:
        s_tr = s_tr[: hp["blitzer_ft_source"]]
    train = Split([S.texts[i] for i in s_tr], S.y[s_tr])
    val = Split([S.texts[i] for i in ctx["s_val"]], S.y[ctx["s_val"]])
    torch.manual_seed(seed)
    clf = Classifier(minilm(max_len), 2)
    clf.head.load_state_dict(ctx["probe_head"].state_dict())  # LP-FT, as the fine-tune step does
    extra: dict[str, Any] = {"n_source_used": len(s_tr)}
    if method == "lora":
        extra |= apply_lora(clf, LoraConfig(r=hp["lora_r"], alpha=hp["lora_alpha"], lr=hp["lora_lr"]))["lora"]
        cfg = TrainConfig(
            threads=ctx["threads"],
            epochs=hp["lora_epochs"],
            batch_size=hp["ft_batch"],
            lr=hp["lora_lr"],
            head_lr=hp["ft_head_lr"],
        )
    else:
        cfg = TrainConfig(
            threads=ctx["threads"],
            epochs=hp["ft_epochs"],
            batch_size=hp["ft_batch"],
            lr=hp["ft_lr"],
            head_lr=hp["ft_head_lr"],
        )
    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        hist, dt, other, cpu = timed(fine_tune, clf, train, val, cfg, seed, Path(tmp), frozen_k=0, name=method)
    if method == "lora":
        merge_lora(clf)
    best = max(hist, key=lambda h: (h["val_acc"], -h["val_loss"]))
    acc = clf_acc(clf, [T.texts[i] for i in ctx["t_te"]], T.y[ctx["t_te"]])
    return {
        "acc": acc,
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "source_val_acc": best["val_acc"],
        "selected_epoch": best["epoch"],
        "history": rounded_history(hist),
        **extra,
    }


def _run_top(method: str, ctx: dict[str, Any]) -> dict[str, Any]:
    hp, S, T, seed, store = ctx["hp"], ctx["S"], ctx["T"], ctx["seed"], ctx["store"]
    max_len = hp["uci_max_length"] if ctx["setting"] == "uci" else hp["blitzer_max_length"]
    torch.manual_seed(seed)
    head = nn.Linear(384, 2)
    head.load_state_dict(ctx["probe_head"].state_dict())
    minilm(max_len)  # make sure the pristine encoder is loaded
    model = TopModel(
        TopLayers(_PRISTINE[max_len], hp["top_layers"] if ctx["setting"] == "uci" else hp["blitzer_top_layers"]), head
    )
    algo = {"top-ft": "source-only"}.get(method, method.removesuffix("+ent"))
    trade = {"coral": hp["coral_weight"], "dann": hp["dann_weight"]}.get(algo, 1.0)
    src_ids = store.ids(ctx["src"], ctx["s_tr"])
    val_ids = store.ids(ctx["src"], ctx["s_val"])
    v_order = np.argsort([len(store.states[int(i)]) for i in val_ids], kind="stable")
    val_ids, val_y = val_ids[v_order], S.y[ctx["s_val"]][v_order]
    tgt_ids = store.ids(ctx["tgt"], ctx["t_un"])
    test_ids = store.ids(ctx["tgt"], ctx["t_te"])
    order = np.argsort([len(store.states[int(i)]) for i in test_ids], kind="stable")
    test_ids, test_y = test_ids[order], T.y[ctx["t_te"]][order]

    def target_test(m: nn.Module) -> dict[str, float]:  # diagnostics only, never used for selection
        return {"target_test_acc": da.evaluate(m, test_ids, test_y, prepare=store.prepare, batch_size=128)["acc"]}

    hist, dt, other, cpu = timed(
        da.adapt,
        model,
        algo,
        (src_ids, S.y[ctx["s_tr"]]),
        tgt_ids,
        epochs=hp["top_epochs"] if ctx["setting"] == "uci" else hp["blitzer_top_epochs"],
        batch_size=hp["top_batch"],
        lr=hp["top_lr"],
        trade_off=trade,
        seed=seed,
        source_val=(val_ids, val_y),
        select="source_val",
        optimizer=hp["top_optimizer"],
        weight_decay=hp["top_weight_decay"],
        lr_schedule=hp["top_schedule"],
        prepare=store.prepare,
        discriminator_hidden=hp["disc_hidden"],
        entropy_weight=hp["entropy_weight"] if method.endswith("+ent") else 0.0,
        monitor=target_test if ctx["verbose"] else None,
        log=epoch_printer(method, seed, ctx["verbose"]),
        eval_batch_size=128,
    )
    acc = da.evaluate(model, test_ids, test_y, prepare=store.prepare, batch_size=128)["acc"]
    sel = next(r for r in hist if r["selected"])
    last = hist[-1]
    res = {
        "acc": acc,
        "seconds": dt,
        "other_cpu": other,
        "cpu_seconds": cpu,
        "source_val_acc": sel["source_val_acc"],
        "selected_epoch": sel["epoch"],
        "trade_off": trade,
        "history": rounded_history(hist),
        "final_cls_loss": last["cls_loss"],
        "final_transfer_loss": last["transfer_loss"],
    }
    if "domain_acc" in last:
        res["final_domain_acc"] = last["domain_acc"]
    return res
