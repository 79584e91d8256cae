"""``bench/perf.py --only runners`` (or ``bench/runner_overhead.py``): the kfp-local runner's per-step overhead
against the in-process runner on the demo target config (issue 20, item 3).

The demo's source task is run once (``tlops run`` on ``configs/digits_source.yaml``: it registers
``digits-source@champion``, which the target config pulls), or taken from ``--base``. Then, interleaved
(local, kfp-local, kfp-local, local, ...), each repeat copies that workdir to a fresh one and runs
``tlops run --config configs/digits_target.yaml`` as a CLI process, once per runner, every process under
``PYTHONPROFILEIMPORTTIME=1`` (both sides alike) so the imports each one pays are read from its own output.

What is read back, without hooks in tlops:

* the CLI process's wall time (interpreter start to exit);
* in-process: each step's seconds (the ``step_seconds.<step>`` metrics of the run in the MLflow store);
* kfp-local, from each task's log (``<run>/<step>/task.log``): the task process's start and exit (the line
  ``tlops.kfp.pipeline`` appends), ``run_task``'s entry, the step's start and seconds and ``run_task``'s return
  (the line ``tlops.kfp.task`` prints), and the task's imports. A task's time splits into: start-up (process,
  interpreter, kfp's executor, the component module and ``tlops.kfp.task`` imports, up to ``run_task``),
  ``run_task`` before the step (config, input artifacts' manifests), the step (its library imports included),
  after the step (KFP outputs, metrics) and exit (the executor writing its outputs, interpreter shut-down);
* orchestration: the CLI's wall minus the task processes' (the parent's imports, compiling the pipeline,
  kfp.local building each executor input and reading outputs back, the summary).

    .venv/bin/python bench/runner_overhead.py                      # 3 repeats: bench/results/runners.md + .json
    .venv/bin/python bench/runner_overhead.py --base W --repeats 1 --set train.epochs=1
    .venv/bin/python bench/runner_overhead.py --render bench/results/runners.json

``--set`` overrides go to both runners (a shorter check on a loaded machine; the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, run_info, run_machine, write_report
from perf_setup import child_env

SOURCE, TARGET = "configs/digits_source.yaml", "configs/digits_target.yaml"
STEPS = ("ingest", "pull-model", "extract-features", "fine-tune", "evaluate", "register")
SIDES = ("local", "kfp-local", "kfp-local-fresh")  # kfp-local-fresh: --task-processes fresh (as kfp.local starts them)
RUNNER_ARGS = {
    "local": ["--runner", "local"],
    "kfp-local": ["--runner", "kfp-local"],
    "kfp-local-fresh": ["--runner", "kfp-local", "--task-processes", "fresh"],
}
KFP_SIDES = ("kfp-local", "kfp-local-fresh")
PHASES = ("start-up", "before step", "step", "after step", "exit")
TASK_PREFIX, PROCESS_PREFIX = "[tlops task] ", "[tlops kfp-local] "  # tlops.kfp.task / tlops.kfp.pipeline
_IMPORT = re.compile(r"^import time:\s+(\d+)\s+\|\s+\d+\s+\|( *)(\S+)\s*$")
GROUPS = ("kfp", "tlops", "torch/timm", "mlflow", "sklearn", "other")
LIBRARIES = ("kfp", "torch/timm", "mlflow", "sklearn")  # what they import counts as theirs


def import_seconds(text: str) -> dict[str, float]:
    """Seconds of imports in ``-X importtime`` output, by group: each module's own (self) time goes to
    its library's group, a module that a library imports counts as that library's (scipy under
    scikit-learn, pandas and SQLAlchemy under MLflow), and tlops's modules are tlops."""

    def own(name: str) -> str:
        top = name.split(".")[0]
        return next((g for g in GROUPS if top in g.split("/")), "other")

    rows = [(int(m.group(1)), len(m.group(2)), m.group(3)) for m in map(_IMPORT.match, text.splitlines()) if m]
    out = dict.fromkeys(GROUPS, 0.0)
    stack: list[tuple[int, str]] = []  # (indent, group) of the importing modules
    for self_us, indent, name in reversed(rows):  # the output is post-order: reversed, a parent comes first
        while stack and stack[-1][0] >= indent:
            stack.pop()
        group = own(name)
        if group not in LIBRARIES and stack and stack[-1][1] in LIBRARIES:
            group = stack[-1][1]
        stack.append((indent, group))
        out[group] += self_us / 1e6
    return out


def _json_line(text: str, prefix: str) -> dict[str, Any] | None:
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(prefix)), None)
    return json.loads(line[len(prefix) :]) if line else None


def kfp_tasks(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per step: the task's phases (seconds) and imports, from its log."""
    out = {}
    for step in STEPS:
        text = (run_dir / step / "task.log").read_text(errors="replace")
        proc, task = _json_line(text, PROCESS_PREFIX), _json_line(text, TASK_PREFIX)
        if proc is None or task is None:
            raise RuntimeError(f"{run_dir / step / 'task.log'}: no timing lines (a tlops without them?)")
        step_end = task["step_started"] + task["step_seconds"]
        phases = {
            "start-up": task["entered"] - proc["started"],
            "before step": task["step_started"] - task["entered"],
            "step": task["step_seconds"],
            "after step": task["left"] - step_end,
            "exit": proc["exited"] - task["left"],
        }
        out[step] = {
            "seconds": proc["exited"] - proc["started"],
            "phases": phases,
            "imports": import_seconds(text),
            "forked": bool(proc.get("forked")),
        }
    return out


def local_steps(workdir: Path) -> dict[str, float]:
    """The newest MLflow run's ``step_seconds.<step>`` metrics (the in-process runner logs them)."""
    with sqlite3.connect(workdir / "mlflow.db") as db:
        (run,) = db.execute("SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1").fetchone()
        rows = db.execute("SELECT key, value FROM metrics WHERE run_uuid = ? AND key LIKE 'step_seconds.%'", (run,))
        return {k.split(".", 1)[1]: v for k, v in rows}


def run_side(side: str, base: Path, work: Path, sets: list[str]) -> dict[str, Any]:
    wd = work / f"{side}-{time.time_ns()}"
    shutil.copytree(base, wd, symlinks=True)
    cmd = [sys.executable, "-m", "tlops", "run", "--config", TARGET, "--set", f"workdir={wd}", *RUNNER_ARGS[side]]
    cmd += [x for s in sets for x in ("--set", s)]
    env = child_env() | {"PYTHONPROFILEIMPORTTIME": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row: dict[str, Any] = {"wall": wall, "load": os.getloadavg()[0], "cli_imports": import_seconds(proc.stderr)}
    if side == "local":
        row["steps"] = local_steps(wd)
    else:
        (run_dir,) = [p for p in (wd / "kfp-local").iterdir() if p.is_dir()]
        tasks = kfp_tasks(run_dir)
        row["tasks"] = tasks
        row["steps"] = {s: t["seconds"] for s, t in tasks.items()}
    shutil.rmtree(wd, ignore_errors=True)
    print(f"{side}: {wall:.1f} s (load {row['load']:.1f})", flush=True)
    return row


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(p: dict[str, Any]) -> str:
    """The markdown report from a run's JSON payload (``--render`` rewrites it without rerunning)."""
    sides = [s for s in SIDES if any(r["side"] == s for r in p["runs"])]  # older payloads: no fresh side
    runs = {s: [r for r in p["runs"] if r["side"] == s] for s in sides}
    wall = {s: _med([r["wall"] for r in runs[s]]) for s in sides}
    ratio = {s: wall[s] / wall["local"] for s in sides}
    step = {s: {st: _med([r["steps"][st] for r in runs[s]]) for st in STEPS} for s in sides}
    kfp = [s for s in KFP_SIDES if s in sides]
    tasks = {s: [r["tasks"] for r in runs[s]] for s in kfp}
    phase = {s: {st: {ph: _med([t[st]["phases"][ph] for t in tasks[s]]) for ph in PHASES} for st in STEPS} for s in kfp}
    imp = {s: {st: {g: _med([t[st]["imports"][g] for t in tasks[s]]) for g in GROUPS} for st in STEPS} for s in kfp}
    task_sum = {s: _med([sum(t[st]["seconds"] for st in STEPS) for t in tasks[s]]) for s in kfp}

    def all_imports(r: dict[str, Any]) -> float:
        return sum(r["cli_imports"].values()) + sum(sum(t["imports"].values()) for t in r.get("tasks", {}).values())

    imports = {s: _med([all_imports(r) for r in runs[s]]) for s in sides}
    forked = {s: sum(t[st].get("forked", False) for t in tasks[s] for st in STEPS) for s in kfp}
    info, n = p["info"], len(runs["local"])
    loads = [r["load"] for r in p["runs"]]
    sets = p.get("sets") or []
    label = {
        "local": "in-process",
        "kfp-local": "kfp-local (forked tasks)",
        "kfp-local-fresh": "kfp-local, fresh task processes",
    }
    lines = [
        "# kfp-local runner overhead vs the in-process runner (demo target config)",
        "",
        f"Command: `{info['command']}`. {run_machine(info)}; load average during the runs "
        f"{min(loads):.1f}-{max(loads):.1f}.",
        "",
        f"`tlops run --config {TARGET}`"
        + (f" with `{' '.join('--set ' + s for s in sets)}`" if sets else "")
        + f" in a fresh copy of a workdir where the demo source task registered `digits-source@champion`; "
        f"each side a CLI process, interleaved, median of {n}; every process under `PYTHONPROFILEIMPORTTIME=1` "
        "(every side). Sides: " + ", ".join(f"{label[s]} (`{' '.join(RUNNER_ARGS[s])}`)" for s in sides) + ".",
        "",
        "**Wall time: "
        + ", ".join(f"{label[s]} {wall[s]:.1f} s" + ("" if s == "local" else f" ({ratio[s]:.2f}x)") for s in sides)
        + "** (goal for kfp-local: <= 1.5x in-process).",
        "",
    ]
    for s in kfp:
        ph = phase[s]
        lines += [
            f"### {label[s]}",
            "",
            f"| step | in-process s | task s | overhead s | {' | '.join(PHASES)} |",
            "|---|---:|---:|---:|" + "---:|" * len(PHASES),
            *(
                f"| {st} | {step['local'][st]:.1f} | {step[s][st]:.1f} | {step[s][st] - step['local'][st]:+.1f} | "
                + " | ".join(f"{ph[st][x]:.2f}" for x in PHASES)
                + " |"
                for st in STEPS
            ),
            "",
            f"Orchestration (CLI wall minus its task processes: the parent's start-up and imports, compiling the "
            "pipeline, kfp.local building executor inputs and reading outputs, the summary): "
            f"{wall[s] - task_sum[s]:.1f} s; "
            f"the in-process CLI outside its steps: {wall['local'] - sum(step['local'].values()):.1f} s. "
            f"Tasks forked from the preloaded forkserver: {forked[s]}/{len(STEPS) * len(tasks[s])}.",
            "",
            "Imports each task paid (`-X importtime` self times; a module a library imports counts as that "
            "library's; seconds):",
            "",
            "| step | " + " | ".join(GROUPS) + " |",
            "|---|" + "---:|" * len(GROUPS),
            *(f"| {st} | " + " | ".join(f"{imp[s][st][g]:.2f}" for g in GROUPS) + " |" for st in STEPS),
            "",
        ]
    lines += [
        "All imports of a run (seconds): "
        + ", ".join(f"{label[s]} {imports[s]:.1f}" for s in sides)
        + ". In-process: one process; kfp-local: the CLI (with the forkserver's preload, whose `-X importtime` "
        "lines share the CLI's stderr) and six task processes.",
        "",
        "Phases of a task: start-up = process start to `run_task` (forked: the fork from the forkserver, which "
        "the first task waits for until the forkserver has imported torch, MLflow and scikit-learn; fresh: sh and "
        "the interpreter; then kfp's executor, the component module, `tlops.kfp.task`); before step = config and "
        "input manifests; step = `execute_step` (the step's own imports included); after step = KFP outputs; "
        "exit = the executor writing its outputs and the process ending.",
        "",
    ]
    if max(loads) > 1.5:
        lines += ["The machine was shared with other jobs during this run: rerun idle before quoting the ratio.", ""]
    return "\n".join(lines)


def source_workdir(tmp: Path) -> Path:
    base = tmp / "base"
    cmd = [sys.executable, "-m", "tlops", "run", "--config", SOURCE, "--set", f"workdir={base}"]
    subprocess.run(cmd, cwd=REPO, env=child_env(), check=True, capture_output=True)
    return base


def main(argv: list[str] | None = None, repeats: int | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=repeats or 3)
    ap.add_argument("--base", type=Path, help="a workdir where the demo source task ran (skips running it)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for both runners")
    ap.add_argument("--out", default=str(RESULTS / "runners"), help="results path prefix")
    ap.add_argument("--render", metavar="JSON", help="rewrite the markdown from a run's JSON, without running")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(report(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    info = run_info("bench/runner_overhead.py", argv)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tlops-bench-runners-") as tmp:
        base = args.base or source_workdir(Path(tmp))
        order = [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(args.repeats)]
        for sides in order:
            for side in sides:
                runs.append({"side": side} | run_side(side, base, Path(tmp), args.sets))
    payload = {"info": info, "sets": args.sets, "runs": runs, "total_seconds": time.perf_counter() - t0}
    md = report(payload)
    out = Path(args.out).with_suffix(".md")
    write_report(out, md, payload)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.json')} ({payload['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
