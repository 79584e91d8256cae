"""Sections 4 and 5 of bench/perf.py: peak RSS of every ``tlops step`` process (and of extract-features at 1x
and 10x the data), and how extraction and fine-tuning time scale with the data."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, minilm_dir
from perf_setup import (
    CNN_BS,
    CNN_LR,
    FT_BS,
    FT_LR,
    FT_MAXLEN,
    IMAGE_BS,
    MAX_LENGTH,
    PASSES,
    TEXT_BS,
    child_env,
    images,
    med,
    reset_threads,
    train_runtime,
    uci,
)

# =============================================================================== 4. memory


# Runs the tlops CLI in a child and writes the child's VmHWM (peak RSS of its own address space) at exit.
# Not ru_maxrss: Linux folds the pre-exec high-water mark, i.e. this big parent's RSS copied at fork,
# into the child's ru_maxrss.
_HWM_WRAPPER = """
import atexit, sys
def _hwm(path=sys.argv[1]):
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(path, 'w').write(line.split()[1])
atexit.register(_hwm)
sys.argv = ['tlops'] + sys.argv[2:]
from tlops.cli import main
main()
"""


def _rss_child(cmd: list[str], env, cwd) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, output tail) of ``tlops <args>`` (cmd[0] is the tlops executable) in a child process."""
    with tempfile.NamedTemporaryFile(prefix="tlops-hwm-", suffix=".txt") as f:
        full = [sys.executable, "-c", _HWM_WRAPPER, f.name] + cmd[1:]
        t0 = time.perf_counter()
        p = subprocess.run(full, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        out = p.stdout.decode(errors="replace")
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
        kib = Path(f.name).read_text().strip()
    return dt, int(kib) / 1024, out[-500:]


def _steps_rss(config: Path, sets: list[str], work: Path, env, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    from tlops.dag import DAG

    tlops_cli = str(Path(sys.executable).parent / "tlops")
    out: dict[str, Any] = {}
    for spec in DAG:
        if only and spec.name not in only:
            continue
        cmd = [tlops_cli, "step", spec.name, "--config", str(config), "--out", str(work / spec.name)]
        for s in sets:
            cmd += ["--set", s]
        for name, producer in spec.inputs.items():
            cmd += ["--in", f"{name}={work / producer}"]
        dt, rss, _ = _rss_child(cmd, env, REPO)
        out[spec.name] = {"seconds": dt, "rss_mib": rss}
        print(f"  memory | {config.name} {spec.name}: peak RSS {rss:.0f} MiB ({dt:.1f} s)", flush=True)
    return out


def bench_memory(args, sz) -> dict[str, Any]:
    import numpy as np

    env = child_env()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tlops-perf-mem-") as tmp:
        tmp = Path(tmp)
        if "demo" in sz["mem_configs"]:
            res["demo"] = _steps_rss(
                REPO / "configs" / "digits_source.yaml", [f"workdir={tmp}/w1", "train.epochs=1"], tmp / "demo", env
            )
        if "text" in sz["mem_configs"]:
            res["text"] = _steps_rss(
                REPO / "configs" / "sentiment.yaml",
                [f"workdir={tmp}/w2", "train.epochs=1", "evaluate.scratch_baseline=false"],
                tmp / "text",
                env,
            )
        # streaming: extract-features at 1x and 10x data (rows repeated; a suffix keeps them distinct)
        x, y = uci(("yelp",))
        n = sz["mem_text"]
        xi, yi = images("mnist")
        m = sz["mem_image"]
        res["stream"] = {}
        for k in (1, 10):
            tsv = tmp / f"text{k}.tsv"
            tsv.write_text("".join(f"{x[i % n]} ({i // n})\t{y[i % n]}\n" for i in range(n * k)), encoding="utf-8")
            npz = tmp / f"img{k}.npz"
            np.savez(npz, x=np.concatenate([xi[:m]] * k), y=np.concatenate([yi[:m]] * k))
            for kind, cfgfile, sets in (
                (
                    "text",
                    REPO / "configs" / "sentiment.yaml",
                    [f"data.source={tsv}", f"workdir={tmp}/s{k}", "data.split.test=0.2", "data.split.val=0.2"],
                ),
                (
                    "image",
                    REPO / "configs" / "digits_source.yaml",
                    [f"data.source={npz}", f"workdir={tmp}/i{k}", "data.classes=null", "source.image_size=28"],
                ),
            ):
                if kind not in sz["mem_stream"]:
                    continue
                r = _steps_rss(
                    cfgfile, sets, tmp / f"{kind}{k}", env, only=("ingest", "pull-model", "extract-features")
                )
                res["stream"].setdefault(kind, {})[f"{k}x"] = {
                    "items": (n if kind == "text" else m) * k,
                    "rss_mib": r["extract-features"]["rss_mib"],
                    "seconds": r["extract-features"]["seconds"],
                    "ingest_rss_mib": r["ingest"]["rss_mib"],
                }
        for d in res["stream"].values():
            d["growth"] = d["10x"]["rss_mib"] / d["1x"]["rss_mib"]
            d["delta_mib"] = d["10x"]["rss_mib"] - d["1x"]["rss_mib"]
    return res


# =============================================================================== 5. scaling


def bench_scaling(args, sz) -> dict[str, Any]:
    import numpy as np
    import torch

    from tlops.config import TrainConfig
    from tlops.data.dataset import Split
    from tlops.features.extract import extract
    from tlops.models.backbone import ImageBackbone, TextBackbone
    from tlops.models.bundle import Classifier
    from tlops.training.finetune import fine_tune

    mults = (1, 2, 4, 8)
    reps = 2 if not args.quick else 1
    x, y = uci()
    xi, yi = images("mnist")
    tb = TextBackbone.create(str(minilm_dir()), max_length=MAX_LENGTH, pooling="mean").eval()
    torch.manual_seed(0)
    ib = ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=32).eval()
    tbf = TextBackbone.create(str(minilm_dir()), max_length=FT_MAXLEN, pooling="mean")
    tclf = Classifier(tbf, 2)
    cclf = Classifier(ImageBackbone.create("resnet10t", pretrained=False, in_chans=1, image_size=32), 10)
    ux, uy = images("usps")

    def ft(clf0, split, bs, lr):
        clf = copy.deepcopy(clf0)
        rt = train_runtime(args)
        cfg = TrainConfig(strategies=["fine-tune"], epochs=1, batch_size=bs, lr=lr, head_lr=lr, weight_decay=0.0, **rt)
        with tempfile.TemporaryDirectory(prefix="tlops-perf-scale-") as tmp:
            fine_tune(clf, split, None, cfg, 0, Path(tmp), frozen_k=0, name="scale")

    work = {
        "extract text (MiniLM, UCI)": (sz["scale_text"], lambda n: extract(tb, x[:n], TEXT_BS)),
        "extract image (resnet10t, MNIST)": (sz["scale_image"], lambda n: extract(ib, xi[:n], IMAGE_BS)),
        "fine-tune text (MiniLM, yelp, 1 epoch)": (
            sz["scale_ft_text"],
            lambda n: ft(tclf, Split(x[:n], np.array(y[:n])), FT_BS, FT_LR),
        ),
        "fine-tune CNN (resnet10t, USPS, 1 epoch)": (
            sz["scale_ft_cnn"],
            lambda n: ft(cclf, Split(ux[:n], uy[:n]), CNN_BS, CNN_LR),
        ),
    }
    out = {}
    for label, (n0, fn) in work.items():
        fn(min(n0, 32))  # warm-up
        times = {}
        for k in mults:
            ts = []
            for _ in range(reps):
                reset_threads()
                dt, _ = PASSES.timed(f"scaling/{label}/{k}x", fn, n0 * k)
                ts.append(dt)
            times[k] = med(ts)
            print(f"  scaling | {label} {k}x ({n0 * k} items): {times[k]:.2f} s", flush=True)
        ns = np.log([n0 * k for k in mults])
        slope = float(np.polyfit(ns, np.log([times[k] for k in mults]), 1)[0])
        slope_hi = float(np.polyfit(ns[1:], np.log([times[k] for k in mults[1:]]), 1)[0])
        per_item, fixed = (float(v) for v in np.polyfit([n0 * k for k in mults], [times[k] for k in mults], 1))
        out[label] = {
            "n0": n0,
            "seconds": {f"{k}x": times[k] for k in mults},
            "slope": slope,
            "slope_2x_8x": slope_hi,
            "per_item_ms": 1000 * per_item,
            "fixed_s": fixed,
        }
        print(
            f"  -> {label}: log-log slope {slope:.2f} (2x-8x: {slope_hi:.2f}); t = {fixed:.2f} s + "
            f"{1000 * per_item:.1f} ms/item",
            flush=True,
        )
    return out
