"""Ctrl-C (SIGINT) and SIGTERM (what Kubernetes, KFP and most schedulers send) stop a run cleanly.

The handlers raise :class:`Interrupted` in the main thread, so the run unwinds like on any
error: step temp dirs are removed (``artifacts.write_artifact``), locks are released (context
managers), the MLflow run is ended as KILLED (``tracking.setup.pipeline_run``) and the completed
epoch checkpoints stay where the rerun finds them. ``tlops.cli.main`` then prints one line
saying what was interrupted and what was kept, and exits 130 (SIGINT) or 143 (SIGTERM).

:class:`Interrupted` derives from ``BaseException`` and not ``KeyboardInterrupt``: typer turns a
``KeyboardInterrupt`` into exit code 130 whatever the signal, and ``except Exception`` handlers
in the code it passes through must not swallow it.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

#: exit code per signal: 128 + the signal number, what a shell reports for a process it killed
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


@dataclass
class Progress:
    """What is running (noted by the runner as it goes), for the one-line report."""

    run_id: str | None = None
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    step: str | None = None
    checkpoints: Path | None = None


progress = Progress()


def note(**what: object) -> None:
    """Record what is running now (``run_id``, ``run_dir``, ``mlflow_run_id``, ``step``, ``checkpoints``)."""
    for k, v in what.items():
        setattr(progress, k, v)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise :class:`Interrupted` (once: a second signal during the
    clean-up is ignored, so the clean-up finishes). The previous handlers are restored after."""
    global progress
    progress = Progress()
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    for s in EXIT_CODES:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def report(e: Interrupted | KeyboardInterrupt) -> str:
    """One line: the signal, the step and run it stopped, what was kept, how to resume."""
    from tlops.artifacts import is_finished

    name = e.name if isinstance(e, Interrupted) else "SIGINT"
    p = progress
    where = (f" during {p.step}" if p.step else "") + (f" of run {p.run_id}" if p.run_id else "")
    kept = []
    if p.run_dir is not None and p.run_dir.is_dir():
        done = [d.name for d in sorted(p.run_dir.iterdir()) if d.is_dir() and is_finished(d)]
        if done:
            kept.append(f"finished steps {', '.join(done)} in {p.run_dir}")
    if p.checkpoints is not None and p.checkpoints.is_dir():
        epochs = sorted(p.checkpoints.rglob("epoch_*.pt"))
        if epochs:
            kept.append(f"{len(epochs)} epoch checkpoint(s) in {p.checkpoints} (the rerun resumes from them)")
    tracked = f"; MLflow run {p.mlflow_run_id} marked KILLED" if p.mlflow_run_id else ""
    return (
        f"tlops: interrupted by {name}{where}; kept: {'; '.join(kept) or 'nothing'}{tracked}; "
        "temp dirs removed, rerun the same command to continue"
    )
