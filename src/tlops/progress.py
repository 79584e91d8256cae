"""Progress of long loops (feature extraction, training epochs), the same API everywhere.

A loop reports through ``task``::

    with progress.task(f"{strategy} epoch {e}/{E}", total=n_batches, unit="batch") as p:
        for batch in loader:
            ...
            p.advance()

What the user sees depends on where stderr goes:

- a terminal: a rich progress bar (done/total, items/s, elapsed, ETA), gone when the task ends
  (the loop's own summary log line stays);
- anything else (KFP pod logs, docker compose, CI, a file, pytest): an ordinary log line
  (logger ``tlops.progress``) at most every ``interval`` seconds (30 by default,
  ``TLOPS_PROGRESS_INTERVAL`` overrides it) and only once a task has run that long, so a
  scheduler's log shows a long epoch is alive without a line per batch; a short task prints
  nothing extra.

``--quiet`` disables both. The reporter is process-wide (``reporter()``); tests build their own
``Reporter`` with a fake clock or a rich ``Console`` writing into a buffer.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any, Callable

log = logging.getLogger("tlops.progress")

DEFAULT_INTERVAL = 30.0  # seconds between two progress lines in a non-TTY log
INTERVAL_ENV = "TLOPS_PROGRESS_INTERVAL"


def _default_interval() -> float:
    try:
        return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _plural(unit: str) -> str:
    if unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


class Task:
    """One running loop: ``advance(n)`` after each batch (also callable: ``task(n)``)."""

    def __init__(self, reporter: Reporter, desc: str, total: int | None, unit: str) -> None:
        self.reporter = reporter
        self.desc = desc
        self.total = total
        self.unit = unit
        self.completed = 0
        self.started = reporter.clock()
        self._rich_id: Any = None

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self.reporter._advanced(self, n)

    __call__ = advance

    def line(self, now: float) -> str:
        """The non-TTY line, e.g. ``extract train: 1,200/3,000 items (40%), 85.3 items/s, 0:14 elapsed, ETA 0:21``."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.completed / elapsed
        units = _plural(self.unit)
        if self.total:
            done = f"{self.completed:,}/{self.total:,} {units} ({100 * self.completed / self.total:.0f}%)"
            left = (self.total - self.completed) / rate if rate > 0 else None
            eta = f", ETA {_duration(left)}" if left is not None else ""
        else:
            done, eta = f"{self.completed:,} {units}", ""
        return f"{self.desc}: {done}, {rate:.1f} {units}/s, {_duration(elapsed)} elapsed{eta}"

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.reporter._finished(self)


class Reporter:
    """Renders tasks as a rich bar on a terminal, as rate-limited log lines otherwise.

    ``tty``: None decides from ``stream.isatty()`` (``stream`` default: ``sys.stderr`` at the time a
    task starts); ``console``: the rich Console for the bar (tests pass one with
    ``force_terminal=True`` writing into a StringIO); ``clock``: seconds, monotonic (tests inject
    a fake one); ``emit``: where non-TTY lines go (default: ``logging`` at INFO)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: IO[str] | None = None,
        console: Any = None,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self.tty = tty
        self.interval = _default_interval() if interval is None else interval
        self.clock = clock
        self.stream = stream
        self.console = console
        self.emit = emit or log.info
        self._last_line = float("-inf")  # when the last non-TTY line went out (any task)
        self._bar: Any = None  # the live rich Progress while a task runs on a terminal
        self._active = 0
        self._lock = threading.Lock()

    def task(self, desc: str, total: int | None = None, unit: str = "item") -> Task:
        """Start a task; use it as a context manager (the bar closes when it exits)."""
        t = Task(self, desc, total, unit)
        if self.enabled and self._is_tty():
            with self._lock:
                if self._bar is None:
                    self._bar = self._new_bar()
                    self._bar.start()
                self._active += 1
                t._rich_id = self._bar.add_task(desc, total=total, unit=_plural(unit), rate="")
        return t

    # --- internals ---------------------------------------------------------------------------

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        if self.console is not None:
            return bool(self.console.is_terminal)
        stream = self.stream or sys.stderr
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _new_bar(self) -> Any:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = self.console or Console(file=self.stream or sys.stderr)
        return Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("[progress.data.speed]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            redirect_stderr=True,
            redirect_stdout=True,
        )

    def _advanced(self, t: Task, n: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if t._rich_id is not None:
            elapsed = max(now - t.started, 1e-9)
            self._bar.update(t._rich_id, advance=n, rate=f"{t.completed / elapsed:.1f} {_plural(t.unit)}/s")
            return
        with self._lock:
            if now - t.started >= self.interval and now - self._last_line >= self.interval:
                self._last_line = now
                self.emit(t.line(now))

    def _finished(self, t: Task) -> None:
        if t._rich_id is None:
            return
        with self._lock:
            self._bar.remove_task(t._rich_id)
            t._rich_id = None
            self._active -= 1
            if self._active == 0:
                self._bar.stop()
                self._bar = None


_reporter = Reporter()


def reporter() -> Reporter:
    """The process-wide reporter (what ``task`` uses; hand it to a training runtime as its hook)."""
    return _reporter


def configure(**kwargs: Any) -> Reporter:
    """Replace the process-wide reporter (``tlops.logs.setup`` turns it off for ``--quiet``)."""
    global _reporter
    _reporter = Reporter(**kwargs)
    return _reporter


def disabled() -> Reporter:
    """A reporter that shows nothing: what a DDP rank other than 0 hands its loops."""
    return Reporter(enabled=False)


def task(desc: str, total: int | None = None, unit: str = "item") -> Task:
    """``with progress.task("extract train", total=n) as p: ... p.advance(len(batch))``."""
    return _reporter.task(desc, total, unit)
