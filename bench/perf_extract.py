"""Section 1 of bench/perf.py: feature-extraction throughput, tlops ``extract`` vs the obvious loop, with the
FLOPs each side ran against the machine's matmul peak."""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

from common import minilm_dir
from perf_setup import (
    IMAGE_BS,
    MAX_LENGTH,
    ONE,
    TEXT_BS,
    DeviceBackbone,
    blitzer,
    images,
    interleave_chunked,
    med,
    uci,
    with_one_thread,
)


def matmul_peak(device: str, n: int = 2048, reps: int = 7) -> dict[str, float]:
    """fp32 (and bf16 on CUDA) ``torch.matmul`` n x n: the best of ``reps`` as the machine's peak."""
    import torch

    out = {}
    for dtype in [torch.float32] + ([torch.bfloat16] if device == "cuda" else []):
        size = n if device == "cpu" else 8192
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.matmul(a, b)
        ts = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        flops = 2 * size**3
        out[str(dtype).split(".")[-1]] = {
            "best_gflops": flops / min(ts) / 1e9,
            "median_gflops": flops / med(ts) / 1e9,
            "n": size,
        }
    return out


# =============================================================================== 1. extraction


def text_flops_per_item(model, lengths: set[int]) -> dict[int, float]:
    """FLOPs of one sequence of each length (eager attention so the attention matmuls count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).cpu().float()
    m.config._attn_implementation = "eager"
    for mod in m.modules():  # transformers keeps the choice on each layer's config too
        if hasattr(mod, "config") and hasattr(mod.config, "_attn_implementation"):
            mod.config._attn_implementation = "eager"
    out = {}
    with torch.inference_mode():
        for t in sorted(lengths):
            ids = torch.full((1, t), 1000, dtype=torch.long)
            with FlopCounterMode(display=False) as fc:
                m(input_ids=ids, attention_mask=torch.ones_like(ids))
            out[t] = float(fc.get_total_flops())
    return out


def image_flops_per_item(backbone, x) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    b = copy.deepcopy(backbone).cpu().float().eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        b(**b.prepare(x[:8]))
    return fc.get_total_flops() / 8


def bench_extract(args, sz) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tlops.features.extract import batches_for, extract
    from tlops.models.backbone import ImageBackbone, TextBackbone

    dev = args.device
    res: dict[str, Any] = {"peak": matmul_peak(dev)}
    print(f"  matmul peak: {res['peak']}", flush=True)
    rows = []

    # ------------------------------------------------------------------ text
    tb = TextBackbone.create(str(minilm_dir()), max_length=MAX_LENGTH, pooling="mean").eval()
    tok = tb.tokenizer
    texts_uci = uci()[0][: sz["uci"]]
    texts_blitzer = blitzer()[: sz["blitzer"]]
    model = tb.model
    l2 = tb.preprocessing.get("normalize") == "l2"
    tl = DeviceBackbone(tb, dev, args.amp, False, args.compile) if dev != "cpu" else tb

    def naive_text(xs):
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), TEXT_BS):
                enc = tok(
                    xs[i : i + TEXT_BS],
                    padding="max_length",
                    max_length=MAX_LENGTH,
                    truncation=True,
                    return_tensors="pt",
                )
                enc = {k: v.to(dev) for k, v in enc.items()}
                ctx = torch.autocast(dev, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
                with ctx:
                    hidden = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                if l2:  # the sentence-transformers pipeline ends with Normalize (tlops reads modules.json)
                    pooled = F.normalize(pooled, dim=-1)
                out.append(pooled.cpu().numpy())
        return np.concatenate(out)

    for label, texts in (
        ("text: MiniLM-L6, UCI sentences", texts_uci),
        ("text: MiniLM-L6, Blitzer reviews", texts_blitzer),
    ):
        print(f"[extract] {label}: {len(texts)} items", flush=True)
        sides = {"naive": naive_text, "tlops": lambda t: extract(tl, t, TEXT_BS, desc="perf")}
        if args.ablation and dev == "cpu":
            sides[ONE] = lambda t: with_one_thread(lambda: extract(tl, t, TEXT_BS, desc="perf"))
        r = interleave_chunked(label, sides, texts, 5 * TEXT_BS, args.repeats, warmup=texts[:TEXT_BS])
        diff = float(np.abs(r["outs"]["naive"][-1] - r["outs"]["tlops"][-1]).max())
        lens = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
        plan = [
            c + s0
            for s0 in range(0, len(texts), 5 * TEXT_BS)  # the batches extract() ran, chunk by chunk
            for c in batches_for(tb, texts[s0 : s0 + 5 * TEXT_BS], TEXT_BS)
        ]
        tl_lens = [int(lens[idx].max()) for idx in plan]
        f = text_flops_per_item(model, set(lens.tolist()) | set(tl_lens) | {MAX_LENGTH})
        useful = float(sum(f[int(v)] for v in lens))
        executed = {
            "naive": len(texts) * f[MAX_LENGTH],
            "tlops": float(sum(len(idx) * f[L] for idx, L in zip(plan, tl_lens, strict=True))),
        }
        rows.append(
            _extract_row(
                label,
                len(texts),
                r,
                useful,
                executed,
                diff,
                f"tokens/item mean {lens.mean():.1f}, max {lens.max()}; naive pads to {MAX_LENGTH}",
            )
        )
        for s in r["outs"].values():
            s.clear()

    # ------------------------------------------------------------------ images
    for name, in_chans, size in (("mnist", 1, 32), ("usps", 1, 32), ("hymenoptera", 3, 64)):
        x = images(name)[0][: sz[name]]
        torch.manual_seed(0)
        ib = ImageBackbone.create("resnet10t", pretrained=False, in_chans=in_chans, image_size=size).eval()
        net = ib.model
        mean = torch.tensor(ib.preprocessing["mean"]).view(1, -1, 1, 1).to(dev)
        std = torch.tensor(ib.preprocessing["std"]).view(1, -1, 1, 1).to(dev)
        il = DeviceBackbone(ib, dev, args.amp, args.channels_last, args.compile) if dev != "cpu" else ib

        def naive_img(xs, size=size, net=net, mean=mean, std=std):
            out = []
            with torch.no_grad():
                for i in range(0, len(xs), IMAGE_BS):
                    xb = torch.from_numpy(xs[i : i + IMAGE_BS]).float().div(255.0)
                    xb = (
                        xb.unsqueeze(1) if xb.ndim == 3 else xb.permute(0, 3, 1, 2).contiguous()
                    )  # ToTensor: contiguous NCHW
                    if xb.shape[-1] != size:
                        xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False)
                    xb = (xb.to(dev) - mean) / std
                    ctx = torch.autocast(dev, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
                    with ctx:
                        out.append(net(xb).float().cpu().numpy())
            return np.concatenate(out)

        label = f"image: resnet10t {size}x{size}x{in_chans}, {name}"
        print(f"[extract] {label}: {len(x)} items", flush=True)
        # the sides run inside this iteration (interleave_chunked below); il=il binds this image set's backbone
        sides = {"naive": naive_img, "tlops": lambda xs, il=il: extract(il, xs, IMAGE_BS, desc="perf")}
        if args.ablation and dev == "cpu":
            sides[ONE] = lambda xs, il=il: with_one_thread(lambda: extract(il, xs, IMAGE_BS, desc="perf"))
        r = interleave_chunked(label, sides, x, 4 * IMAGE_BS, args.repeats, warmup=x[:IMAGE_BS])
        diff = float(np.abs(r["outs"]["naive"][-1] - r["outs"]["tlops"][-1]).max())
        fi = image_flops_per_item(ib, x)
        rows.append(
            _extract_row(
                label,
                len(x),
                r,
                fi * len(x),
                {"naive": fi * len(x), "tlops": fi * len(x)},
                diff,
                f"{fi / 1e6:.0f} MFLOP/item",
            )
        )
        for s in r["outs"].values():
            s.clear()
    res["rows"] = rows
    res["peak_end"] = matmul_peak(dev)
    return res


def _extract_row(label, n, r, useful, executed, diff, note) -> dict[str, Any]:
    s = r["secs"]
    row = {
        "workload": label,
        "n": n,
        "note": note,
        "max_abs_diff": diff,
        "useful_gflop": useful / 1e9,
        "secs": s,
        "executed_gflop": {k: v / 1e9 for k, v in executed.items()},
    }
    for side in ("naive", "tlops"):
        t = med(s[side])
        row[side] = {"items_s": n / t, "useful_gflops": useful / t / 1e9, "executed_gflops": executed[side] / t / 1e9}
    row["ratio"] = row["tlops"]["items_s"] / row["naive"]["items_s"]
    row["cpu_seconds"] = {k: med(v) for k, v in r["cpu"].items()}
    if ONE in s:
        row["one_thread_items_s"] = n / med(s[ONE])
        row["one_thread_ratio"] = row["one_thread_items_s"] / row["naive"]["items_s"]
    print(
        f"  -> {label}: naive {row['naive']['items_s']:.1f}/s, tlops {row['tlops']['items_s']:.1f}/s, "
        f"{row['ratio']:.2f}x; useful GFLOP/s {row['naive']['useful_gflops']:.1f} vs "
        f"{row['tlops']['useful_gflops']:.1f}; "
        f"max |diff| {diff:.1e}",
        flush=True,
    )
    return row
