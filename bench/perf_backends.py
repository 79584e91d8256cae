"""``bench/perf.py --only backends``: extraction backends side by side (issue 20 item 1).

For each workload, every ``features.backend`` tlops offers (torch fp32, torch-int8 for text, onnx,
onnx-int8, and openvino / openvino-int8 when the optional extra is installed, openvino-bf16 also
when the CPU has native bf16) extracts the same rows
through ``tlops.features.extract.extract`` (same batching, same length-sorted dynamic padding), one call
over all rows per pass as the extract-features step makes it, the sides interleaved pass by pass
(A,B,C,... then ...,C,B,A), median of ``--repeats`` passes, all at
one thread (torch, onnxruntime and OpenVINO; the machine is shared). The static int8 models
(onnx-int8 for images, openvino-int8 for both) are calibrated on the workload's first 128 rows.
Downstream accuracy: tlops' linear probe (``tlops.training.probe``, default settings; what ``auto``
and the linear-probe strategy fit) on a seeded stratified half of the workload's labelled rows and
scored on the other half, mean of 5 seeded splits, per backend on that backend's features;
"% of fp32" is backend accuracy / torch accuracy.

Workloads: all-MiniLM-L6-v2 (mean pooling + L2, max length 128) on the UCI sentences (yelp + amazon,
1,000 mixed) and on 400 Blitzer books + dvd reviews; timm resnet10t (random init: no pretrained
weights are available offline here, so its probe accuracy measures how much of a random CNN's
feature geometry int8 keeps) on USPS 32x32 and hymenoptera 64x64. GFLOP/s: FLOPs of each item at its
own length (``FlopCounterMode``), over the median wall time, against the fp32 ``torch.matmul`` peak
and the int8 peak (``torch._int_mm`` and onnxruntime ``MatMulInteger``, best of both), both measured
in the same process at one thread.

Writes ``bench/results/perf_backends.md`` and ``.json`` (``--out`` prefix to change).
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, SHARED_DATA, machine_info, minilm_dir
from perf_setup import PASSES, interleave_chunked, med, remember_default_threads

GOALS = {"text": 3.0, "image": 2.0}  # issue 20: speedup over fp32 torch
QUALITY = 99.6  # % of fp32 downstream accuracy
LIBRARIES = ("torch", "transformers", "timm", "onnxruntime", "onnx", "openvino", "nncf")
SIZES = {
    "full": {"uci": 1000, "blitzer": 400, "usps": 1000, "hymenoptera": 397},
    "quick": {"uci": 200, "blitzer": 60, "usps": 256, "hymenoptera": 64},
}

PROTOCOL = (
    "Protocol: every backend runs `tlops.features.extract.extract` (same length-sorted batches and "
    "dynamic padding; batch 32 texts / 64 images) on the same rows; a pass is one `extract` call over all "
    "the rows, as the extract-features step makes it (texts length-sorted over the whole workload); the sides "
    "alternate pass by pass (A,B,... then ...,B,A), median of the passes. Probe: tlops' linear probe (default "
    "settings, scaling and C by cross-validation on fp32 torch's features, the same (scaling, C) refitted on each "
    "other backend's; what `auto` does) on a seeded stratified half, scored on the other half, mean over "
    "5 seeded splits (UCI: 500 test rows per split, one row = 0.2 points; the fp32 `onnx` rows, whose "
    "features equal torch's to 1e-7, show how far the probe alone moves). int8: per-channel dynamic "
    "(text; torch.ao and onnxruntime) / static QDQ calibrated on the workload's images (CNN; `torch-int8` "
    "leaves convolutions fp32 and is not offered for images). openvino: the same ONNX export converted to "
    "OpenVINO IR, fp32 weights and f32 inference precision (not the CPU plugin's AMX bf16 default); "
    "openvino-bf16: the same IR compiled with bf16 inference precision (AMX-BF16 here; offered only on CPUs "
    "with native bf16), its GFLOP/s against the bf16 `torch.mm` peak; "
    "openvino-int8: NNCF post-training static int8 of that IR (text: ModelType.TRANSFORMER), calibrated on the "
    "workload's first 128 rows (texts tokenised as extraction tokenises them). resnet10t is randomly initialised (no "
    "pretrained weights offline). GFLOP/s count each item at its own length; int8 rows against the int8 "
    "peak. Build s: export (+ quantisation) once per model, cached afterwards. CPU-s speedup: the ratio "
    "of this process's CPU seconds (median pass), less sensitive than wall time to other processes "
    "holding the cores. Reproduce: `.venv/bin/python bench/perf.py --only backends --repeats 3` (about 5 "
    "min on the idle 2-core machine; `--quick`: small sizes, about 3 min)."
)


def int8_peak(n: int = 1024, reps: int = 5) -> dict[str, float]:
    """int8 x int8 -> int32 matmul, n x n, best of ``reps``: ``torch._int_mm`` and onnxruntime ``MatMulInteger``."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.integers(-128, 127, (n, n), dtype=np.int8)
    b = rng.integers(-128, 127, (n, n), dtype=np.int8)
    out: dict[str, float] = {}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch._int_mm(ta, tb)
        ts.append(time.perf_counter() - t0)
    out["torch._int_mm"] = 2 * n**3 / min(ts[1:]) / 1e9
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "mmi",
        [
            helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
            helper.make_tensor_value_info("B", TensorProto.INT8, [n, n]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ua = (a.astype(np.int16) + 128).astype(np.uint8)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        s.run(None, {"A": ua, "B": b})
        ts.append(time.perf_counter() - t0)
    out["onnxruntime MatMulInteger"] = 2 * n**3 / min(ts[1:]) / 1e9
    return out


def matmul_peak(n: int = 1024, reps: int = 5, dtype: str = "float32") -> float:
    """``torch.mm`` n x n, best of ``reps`` (``dtype="bfloat16"``: the bf16 peak, AMX where the CPU has it)."""
    import torch

    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts[1:]) / 1e9


def blitzer_labelled(n: int) -> tuple[list[str], np.ndarray]:
    xs, ys = [], []
    for dom in ("books", "dvd"):
        with gzip.open(SHARED_DATA / "amazon_multidomain_sentiment" / f"{dom}.tsv.gz", "rt", encoding="utf-8") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                xs.append(r["text"])
                ys.append(int(r["label"]))
    order = np.random.default_rng(0).permutation(len(xs))[:n]
    return [xs[i] for i in order], np.array([ys[i] for i in order])


SPLITS = 5  # seeded stratified halves: one split's accuracy moves by a row or two on 1e-7 feature changes


def probe_split_accuracy(f: np.ndarray, y: np.ndarray, settings: dict | None) -> tuple[list[float], dict]:
    """Probe test accuracy on ``SPLITS`` seeded stratified halves (the settings chosen on the first
    split of fp32 torch's features when ``settings`` is None, then reused everywhere)."""
    from sklearn.model_selection import train_test_split

    from tlops.features.backend_choice import probe_accuracy

    accs = []
    for seed in range(SPLITS):
        idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.5, random_state=seed, stratify=y)
        acc, settings = probe_accuracy(f[idx_tr], y[idx_tr], f[idx_te], y[idx_te], settings)
        accs.append(acc)
    return accs, settings


def _workloads(sz: dict[str, int]):
    from perf_setup import images, uci

    from tlops.models.backbone import ImageBackbone, TextBackbone

    tb = TextBackbone.create(str(minilm_dir()), max_length=128, pooling="mean").eval()
    xs, ys = uci()
    yield "text: MiniLM-L6, UCI sentences", tb, xs[: sz["uci"]], np.array(ys[: sz["uci"]]), 32
    bx, by = blitzer_labelled(sz["blitzer"])
    yield "text: MiniLM-L6, Blitzer reviews", tb, bx, by, 32
    import torch

    for name, chans, size in (("usps", 1, 32), ("hymenoptera", 3, 64)):
        x, y = images(name)
        torch.manual_seed(0)
        ib = ImageBackbone.create("resnet10t", pretrained=False, in_chans=chans, image_size=size).eval()
        yield f"image: resnet10t {size}x{size}x{chans}, {name}", ib, x[: sz[name]], y[: sz[name]], 64


def _flops(backbone, x) -> np.ndarray:
    """FLOPs of each item at its own length (text) / per image."""
    from perf_extract import image_flops_per_item, text_flops_per_item

    if backbone.modality == "image":
        return np.full(len(x), image_flops_per_item(backbone, x))
    lens = backbone.token_lengths(x)
    f = text_flops_per_item(backbone.model, set(lens.tolist()))
    return np.array([f[int(v)] for v in lens])


def peaks() -> dict[str, float]:
    return {"fp32": matmul_peak(), "bf16": matmul_peak(dtype="bfloat16"), **int8_peak()}


def bench_backends(args, quick: bool) -> dict[str, Any]:
    import torch

    from tlops.features import backends
    from tlops.features.extract import extract

    torch.set_num_threads(1)
    remember_default_threads()  # interleave_chunked resets every side to this: 1
    sz = SIZES["quick" if quick else "full"]
    res: dict[str, Any] = {"threads": 1, "peak_start": peaks()}
    print(f"  peaks (1 thread, GFLOP/s): {res['peak_start']}", flush=True)
    rows = []
    store = Path(tempfile.mkdtemp(prefix="tlops-perf-backends-"))
    for label, bb, x, y, bs in _workloads(sz):
        names = list(backends.available(bb.modality))  # the OpenVINO ones when the extra is installed
        runners, build_s = {}, {}
        for b in names:
            t0 = time.perf_counter()
            runners[b] = backends.build(
                bb,
                b,
                model_digest=label,
                store=store,
                calibration=x if backends.needs_calibration(b, bb.modality) else None,
                calibration_id=f"{label}:{len(x)}",
            )
            build_s[b] = time.perf_counter() - t0
        print(
            f"[backends] {label}: {len(x)} items; built {json.dumps({k: round(v, 1) for k, v in build_s.items()})} s",
            flush=True,
        )
        sides = {b: (lambda xs, r=runners[b], bs=bs: extract(r, xs, bs, desc="perf")) for b in names}
        # a pass is one extract() call over all rows, as the extract-features step makes it: text is
        # length-sorted over the whole workload (sorting within chunks would pad more and make more
        # distinct shapes than a run does); the sides alternate pass by pass (A,B,... then ...,B,A)
        r = interleave_chunked(f"backends {label}", sides, x, len(x), args.repeats, warmup=x[:bs])
        flops = float(_flops(bb, x).sum())
        ref = r["outs"]["torch"][-1]
        row: dict[str, Any] = {
            "workload": label,
            "n": len(x),
            "gflop": flops / 1e9,
            "build_seconds": build_s,
            "sides": {},
        }
        settings = None  # chosen by CV on torch's features (names[0]), the same (scaling, C) for the others
        for b in names:
            t = med(r["secs"][b])
            f = r["outs"][b][-1]
            accs, settings = probe_split_accuracy(f, y, settings)
            acc = float(np.mean(accs))
            row["sides"][b] = {
                "items_s": len(x) / t,
                "seconds": r["secs"][b],
                "cpu_seconds": med(r["cpu"][b]),
                "gflops": flops / t / 1e9,
                "probe_accuracy": acc,
                "probe_accuracy_per_split": accs,
                "probe": settings,
                "max_abs_diff": float(np.abs(f - ref).max()),
                "mean_cosine": float(
                    np.mean(np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12))
                ),
            }
        base = row["sides"]["torch"]
        for b, s in row["sides"].items():
            s["speedup"] = s["items_s"] / base["items_s"]
            s["pct_of_fp32_accuracy"] = 100 * s["probe_accuracy"] / base["probe_accuracy"]
            print(
                f"  -> {label} | {b}: {s['items_s']:.1f} items/s ({s['speedup']:.2f}x), "
                f"probe {s['probe_accuracy']:.4f} ({s['pct_of_fp32_accuracy']:.2f}% of fp32), "
                f"max |diff| {s['max_abs_diff']:.1e}",
                flush=True,
            )
        rows.append(row)
        for s in r["outs"].values():
            s.clear()
    res["rows"] = rows
    shutil.rmtree(store, ignore_errors=True)  # the exported models (hundreds of MB): built again next run
    res["peak_end"] = peaks()
    return res


def render(info: dict[str, Any], res: dict[str, Any], cmd: str, total: float) -> str:
    peak32 = max(res["peak_start"]["fp32"], res["peak_end"]["fp32"])
    peak8 = max(v for k, v in {**res["peak_start"], **res["peak_end"]}.items() if k not in ("fp32", "bf16"))
    peak16 = max(res["peak_start"].get("bf16", 0.0), res["peak_end"].get("bf16", 0.0)) or peak32  # older payloads

    def both(k: str) -> float:
        return max(res["peak_start"][k], res["peak_end"][k])

    lines = [
        "## Extraction backends: torch fp32 vs torch-int8, onnx, onnx-int8, openvino, openvino-bf16, openvino-int8 "
        "(issue 20 item 1)",
        "",
        f"- machine: {info.get('cpu')}, {info.get('usable_cores')} usable cores, {info.get('memory_gib')} GiB, "
        f"ISA `{info.get('isa')}` (lscpu: avx512_vnni, avx512_bf16, amx_bf16, amx_int8); "
        f"software: Python {info.get('python')}, " + ", ".join(f"{k} {info[k]}" for k in LIBRARIES if k in info),
        f"- date: {info.get('date')}; command: `{cmd}`; total {total / 60:.1f} min; threads: 1 (torch, onnxruntime "
        "and OpenVINO)",
        f"- load average at start {info.get('load_start')}, at end {info.get('load_end')}; other processes' share "
        f"of all CPUs during the timed passes: {PASSES.other_share('backends')}"
        + (
            " (the machine was shared with other workers: the speedups are interleaved medians, but a rerun on "
            "the idle machine should confirm them)"
            if (info.get("load_start") or [0])[0] > 1.5
            else " (idle machine)"
        ),
        f"- matmul peaks at 1 thread (best of start/end): fp32 `torch.mm` 1024² {peak32:.1f} GFLOP/s; bf16 "
        f"`torch.mm` {peak16:.1f} GFLOP/s; int8 "
        f"{peak8:.1f} GOP/s (torch._int_mm {both('torch._int_mm'):.1f}, onnxruntime MatMulInteger "
        f"{both('onnxruntime MatMulInteger'):.1f})",
        "",
        "| workload | n | backend | items/s | speedup vs fp32 torch | CPU-s speedup | probe accuracy | "
        "% of fp32 accuracy | GFLOP/s (% of its peak) | max abs diff vs torch | mean cosine | build s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    goals = []
    for row in res["rows"]:
        kind = "text" if row["workload"].startswith("text") else "image"
        for b, s in row["sides"].items():
            peak = peak8 if b.endswith("int8") else peak16 if b.endswith("bf16") else peak32
            lines.append(
                f"| {row['workload']} | {row['n']:,} | {b} | {s['items_s']:.1f} | **{s['speedup']:.2f}x** | "
                f"{row['sides']['torch']['cpu_seconds'] / s['cpu_seconds']:.2f}x | "
                f"{s['probe_accuracy']:.4f} | {s['pct_of_fp32_accuracy']:.2f}% | "
                f"{s['gflops']:.1f} ({100 * s['gflops'] / peak:.0f}%) | "
                f"{s['max_abs_diff']:.1e} | {s['mean_cosine']:.5f} | {row['build_seconds'][b]:.1f} |"
            )
        ok = [b for b, s in row["sides"].items() if b != "torch" and s["pct_of_fp32_accuracy"] >= QUALITY]
        best = max(ok, key=lambda b: row["sides"][b]["speedup"]) if ok else None
        sp = row["sides"][best]["speedup"] if best else 1.0
        met = "met" if sp >= GOALS[kind] else "NOT met"
        goals.append(
            f"- {row['workload']}: fastest backend at >= {QUALITY}% of fp32 accuracy: "
            f"{best or 'none'} at {sp:.2f}x (goal >= {GOALS[kind]:.0f}x: {met})"
        )
    lines += [
        "",
        "Goals (issue 20: >= 3x MiniLM on UCI and Blitzer, >= 2x resnet10t, at >= 99.6 % of fp32 accuracy):",
        "",
        *goals,
        "",
        PROTOCOL,
        "",
    ]
    return "\n".join(lines)


def rerender(path: Path) -> int:
    """Rewrite ``<path>.md`` from a run's JSON (after a change to the report's wording)."""
    payload = json.loads(path.read_text())
    PASSES[:] = payload["passes"]
    argv = payload["args"].get("argv") or []
    text = render(
        payload["machine"], payload["results"], "python bench/perf.py " + " ".join(argv), payload["total_seconds"]
    )
    path.with_suffix(".md").write_text(text)
    print(f"(rewrote {path.with_suffix('.md')} from {path})")
    return 0


def main(args, quick: bool) -> int:
    t0 = time.perf_counter()
    from tlops.features.backends_openvino import installed

    libs = tuple(k for k in LIBRARIES if k not in ("openvino", "nncf") or installed("openvino-int8"))
    info = machine_info("cpu", libs)
    res = bench_backends(args, quick)
    import os

    info["load_end"] = list(os.getloadavg())
    total = time.perf_counter() - t0
    cmd = "python bench/perf.py " + " ".join(args.argv)
    text = render(info, res, cmd, total)
    print("\n" + text)
    prefix = Path(args.out) if args.out else RESULTS / ("perf_backends-quick" if quick else "perf_backends")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(text)
    payload = {"machine": info, "args": vars(args), "results": res, "passes": PASSES, "total_seconds": total}
    prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    print(f"(written to {prefix.with_suffix('.md')} and .json)")
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        sys.exit(rerender(Path(sys.argv[2])))
    sys.exit("usage: python bench/perf_backends.py --render JSON (measure with: python bench/perf.py --only backends)")
