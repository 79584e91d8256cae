"""The offline demo behind ``make pipeline-local``.

1. Source task: digits 0-4 from ``sklearn:digits``; a small timm CNN trained from scratch
   and registered as ``digits-source`` with alias ``champion``.
2. Target task: digits 5-9 with 10 labels per class; the source model is pulled from
   ``mlflow:models:/digits-source@champion``, features are extracted and cached, linear probe
   and fine-tune are compared against from-scratch, and the result is registered as
   ``digits-target@challenger``.
"""

from __future__ import annotations

import time
from pathlib import Path

from tlops.config import load_config
from tlops.report import console, print_run_summary, rows_table, summary_rows
from tlops.runners.local import run_pipeline


def run_demo(source_config: Path, target_config: Path, overrides: list[str]) -> dict:
    t0 = time.perf_counter()
    src_cfg = load_config(source_config, overrides)
    tgt_cfg = load_config(target_config, overrides)
    console.rule(f"[bold]1/2 source task[/bold]: {src_cfg.name}")
    src = run_pipeline(src_cfg)
    print_run_summary(src_cfg, src)
    console.rule(f"[bold]2/2 target task[/bold]: {tgt_cfg.name}")
    tgt = run_pipeline(tgt_cfg)
    print_run_summary(tgt_cfg, tgt)
    total = time.perf_counter() - t0
    console.rule("[bold]demo summary[/bold]")
    console.print(
        rows_table(
            f"{tgt_cfg.name}: transfer from {tgt_cfg.source.model} (10 labels/class)",
            summary_rows(tgt),
            tgt.artifact("evaluate").meta.get("confidence"),
        )
    )
    maj = tgt.artifact("evaluate")
    console.print(f"demo wall time: {total:.1f}s")
    return {"source": src, "target": tgt, "seconds": total, "evaluation": maj.meta}
