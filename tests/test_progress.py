"""Progress: rate-limited log lines off a terminal, a rich bar on one, silence with --quiet."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from rich.console import Console

from tlops import progress
from tlops.progress import Reporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _non_tty(interval: float = 30.0) -> tuple[Reporter, Clock, list[str]]:
    clock, lines = Clock(), []
    return Reporter(tty=False, interval=interval, clock=clock, emit=lines.append), clock, lines


def test_non_tty_prints_at_most_one_line_per_interval():
    rep, clock, lines = _non_tty()
    with rep.task("fine-tune epoch 1/3", total=800, unit="batch") as p:
        for _ in range(800):  # 800 batches over 100 s: one every 1/8 s
            clock.now += 0.125
            p.advance()
    # lines at 30, 60 and 90 s, none per batch and none at the end (the loop logs its own summary)
    assert lines == [
        "fine-tune epoch 1/3: 240/800 batches (30%), 8.0 batches/s, 0:30 elapsed, ETA 1:10",
        "fine-tune epoch 1/3: 480/800 batches (60%), 8.0 batches/s, 1:00 elapsed, ETA 0:40",
        "fine-tune epoch 1/3: 720/800 batches (90%), 8.0 batches/s, 1:30 elapsed, ETA 0:10",
    ]


def test_a_task_shorter_than_the_interval_prints_nothing():
    rep, clock, lines = _non_tty()
    for e in range(5):  # five 20-s epochs: each alone is short, so no line at all
        with rep.task(f"epoch {e}", total=20) as p:
            for _ in range(20):
                clock.now += 1
                p.advance()
    assert lines == []


def test_the_interval_holds_across_tasks():
    rep, clock, lines = _non_tty(interval=10)
    for name in ("extract train", "extract test"):
        with rep.task(name, total=100) as p:
            for _ in range(15):
                clock.now += 1
                p.advance(5)
    # train: a line at 10 s; test starts at 15 s and prints once it is 10 s old (25 s)
    assert [line.split(":")[0] for line in lines] == ["extract train", "extract test"]
    assert lines[1].startswith("extract test: 50/100 items (50%), 5.0 items/s, 0:10 elapsed, ETA 0:10")


def test_unknown_total_and_callable_task():
    rep, clock, lines = _non_tty(interval=1)
    with rep.task("stream", unit="row") as p:
        clock.now += 2
        p(7)  # a task is also a plain callback
    assert lines == ["stream: 7 rows, 3.5 rows/s, 0:02 elapsed"]


def test_interval_from_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    assert Reporter().interval == 0.5


def test_disabled_reporter_prints_nothing():
    clock, lines = Clock(), []
    rep = Reporter(enabled=False, tty=False, interval=0, clock=clock, emit=lines.append)
    with rep.task("x", total=3) as p:
        clock.now += 100
        p.advance(3)
    assert lines == [] and p.completed == 3


def test_tty_renders_a_rich_bar():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    rep = Reporter(console=console)
    with rep.task("extract train", total=40) as p:
        for _ in range(4):
            p.advance(10)
        rep._bar.refresh()
        shown = buf.getvalue()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert "extract train" in text and "40/40 items" in text and "items/s" in text and "ETA" in text, text
    assert rep._bar is None  # the live display ends with the last task


def test_tty_nested_tasks_share_one_display():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    rep = Reporter(console=console)
    with rep.task("epoch 1/2", total=2) as outer:
        bar = rep._bar
        with rep.task("extract val", total=5) as inner:
            assert rep._bar is bar and len(bar.tasks) == 2
            inner.advance(5)
        assert len(bar.tasks) == 1
        outer.advance(2)
    assert rep._bar is None


def test_extraction_reports_progress(monkeypatch):
    """``features.extract.extract`` advances the process-wide reporter by the items of each batch."""
    import torch

    from tlops.features import extract as ex

    class Backbone(torch.nn.Module):
        feature_dim = 3
        modality = "image"

        def prepare(self, xb):
            return {"x": torch.as_tensor(xb, dtype=torch.float32)}

        def forward(self, x):
            return x[:, :3]

    clock = Clock()
    seen = []

    class Tick(Reporter):
        def _advanced(self, t, n):
            clock.now += 20  # each batch takes 20 s
            seen.append(n)
            super()._advanced(t, n)

    lines: list[str] = []
    monkeypatch.setattr(progress, "_reporter", Tick(tty=False, interval=30, clock=clock, emit=lines.append))
    out = ex.extract(Backbone(), np.arange(50, dtype=np.float32).reshape(10, 5), batch_size=4, desc="extract train")
    assert out.shape == (10, 3) and seen == [4, 4, 2]
    assert lines == ["extract train: 8/10 items (80%), 0.2 items/s, 0:40 elapsed, ETA 0:10"]


@pytest.mark.parametrize("verbosity,enabled", [("quiet", False), ("normal", True), ("verbose", True)])
def test_quiet_turns_progress_off(verbosity, enabled, monkeypatch):
    import logging
    import warnings

    from tlops import logs

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging, "_warnings_showwarning", getattr(logging, "_warnings_showwarning", None))
    monkeypatch.setattr(progress, "_reporter", progress.reporter())
    for name in ("", "tlops"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    logs.setup(verbosity)
    assert progress.reporter().enabled is enabled
