"""What an unchanged rerun of the demo costs, and which heavy libraries it imports (issue 20, item 3).

A fully reused run should be a small fraction of the first one and should not import torch or MLflow
unless it must write to the registry. This script runs ``tlops demo`` once into a fresh workdir, then,
unchanged, ``tlops demo`` again and each demo config alone through ``tlops run --config``, every rerun
under ``python -X importtime`` so the modules it imported are read from its own stderr (no hook in tlops).

    .venv/bin/python bench/rerun.py                 # writes bench/results/rerun.md and rerun.json
    .venv/bin/python bench/rerun.py --workdir W     # reruns against an existing demo workdir W (no first run)

Times are wall seconds of the whole CLI process (interpreter start included); on a shared machine they
are only indicative, which the report says along with the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import REPO, RESULTS, command_line, cpu_model, write_report
from perf_setup import child_env

HEAVY = ("torch", "mlflow", "transformers", "timm", "sklearn", "pandas", "kfp", "sqlalchemy", "scipy", "pyarrow")
CONFIGS = {"source": "configs/digits_source.yaml", "target": "configs/digits_target.yaml"}
BASE = "tlops.cli, tlops.runners.local"  # what every ``tlops run`` imports before its first step
_IMPORT = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S.*)$")


def imported_heavy(stderr: str) -> list[str]:
    """The :data:`HEAVY` top-level packages named in ``-X importtime`` output."""
    tops = {m.group(1).strip().split(".")[0] for line in stderr.splitlines() if (m := _IMPORT.match(line))}
    return [h for h in HEAVY if h in tops]


def run_cli(args: list[str], importtime: bool) -> dict[str, Any]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "tlops", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout + proc.stderr
    reused = re.findall(r"done in [0-9.]+s \(([^)]*) reused\)", out)
    return {"seconds": dt, "heavy": imported_heavy(proc.stderr) if importtime else None, "reused": reused}


# Runs the CLI with builtins.__import__ wrapped: every tlops function that imports mlflow, printed at exit.
_SITES = """
import atexit, builtins, sys
orig, sites = builtins.__import__, {}
def imp(name, globals=None, locals=None, fromlist=(), level=0):
    mod = str((globals or {}).get("__name__", ""))
    if name.split(".")[0] == "mlflow" and mod.startswith("tlops"):
        f = sys._getframe(1)
        sites.setdefault(f"{mod}.{f.f_code.co_name}", None)
    return orig(name, globals, locals, fromlist, level)
builtins.__import__ = imp
atexit.register(lambda: print("MLFLOW-SITES " + " ".join(sites), file=sys.stderr))
sys.argv = ["tlops", *sys.argv[1:]]
from tlops.cli import main
main()
"""


def mlflow_sites(args: list[str]) -> list[str]:
    """The tlops functions that import mlflow (in call order) during ``tlops ARGS``."""
    proc = subprocess.run(
        [sys.executable, "-c", _SITES, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True
    )
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("MLFLOW-SITES")), "MLFLOW-SITES")
    return line.split()[1:]


def import_seconds(modules: str) -> float:
    """Best of 3 wall seconds for a fresh interpreter to ``import modules`` (paid before any step runs)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=REPO, env=child_env(), check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="an existing demo workdir: skip the first run")
    p.add_argument("--out", type=Path, default=RESULTS / "rerun.md")
    a = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tlops-rerun-") as tmp:
        work = a.workdir or Path(tmp) / "work"
        rows: dict[str, dict[str, Any]] = {}
        if a.workdir is None:
            rows["first: tlops demo"] = run_cli(["demo", "--set", f"workdir={work}"], importtime=False)
            print(f"first demo: {rows['first: tlops demo']['seconds']:.1f} s", flush=True)
        rows["rerun: tlops demo"] = run_cli(["demo", "--set", f"workdir={work}"], importtime=True)
        for which, config in CONFIGS.items():
            rows[f"rerun: tlops run {which}"] = run_cli(
                ["run", "--config", config, "--set", f"workdir={work}"], importtime=True
            )
        sites = mlflow_sites(["run", "--config", CONFIGS["target"], "--set", f"workdir={work}"])
        imports = {m: import_seconds(m) for m in (BASE, f"{BASE}, mlflow")}
        for k, r in rows.items():
            print(f"{k}: {r['seconds']:.1f} s, heavy imports {r['heavy']}, reused {r['reused']}", flush=True)
    first = rows.get("first: tlops demo", {}).get("seconds")
    md = [
        "# Unchanged rerun of the demo: wall time and heavy imports",
        "",
        f"`{command_line('bench/rerun.py', argv)}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"CPU {cpu_model()} ({os.cpu_count()} logical cores), load average at start {load0:.2f}. "
        "The machine was shared with other workers: the seconds are indicative only; the import lists are exact.",
        "",
        "| run | wall s | / first demo | heavy modules imported | steps reused |",
        "|---|---:|---:|---|---|",
    ]
    for k, r in rows.items():
        frac = f"{r['seconds'] / first:.1%}" if first else "-"
        heavy = "(not traced)" if r["heavy"] is None else (", ".join(r["heavy"]) or "none")
        md.append(f"| {k} | {r['seconds']:.1f} | {frac} | {heavy} | {'; '.join(r['reused']) or '-'} |")
    md.append("")
    md += [
        "Fresh interpreter, best of 3, `python -c 'import ...'` (what each rerun spends importing):",
        "",
        *(f"- `{m}`: {s:.2f} s" for m, s in imports.items()),
        "",
        "Where the unchanged `tlops run` of the target config imports MLflow (tlops functions, in call order): "
        + (", ".join(f"`{x}`" for x in sites) or "nowhere (the registry answers come from `tlops.tracking.memo`)")
        + ".",
        "",
        "pandas, pyarrow and scipy come in with `import mlflow` itself, sqlalchemy with its sqlite store.",
        "",
    ]
    md.append(f"Heavy modules looked for: {', '.join(HEAVY)} (from each rerun's `python -X importtime` stderr).")
    write_report(
        a.out,
        "\n".join(md) + "\n",
        {"rows": rows, "imports_s": imports, "mlflow_sites": sites, "load_start": load0, "heavy": list(HEAVY)},
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
