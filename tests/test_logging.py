"""One log format (tlops, MLflow, warnings), --quiet / --verbose, and kfp-local output like in-process."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

from tlops import logs, progress

TLOPS = Path(sys.executable).parent / "tlops"
ANSI = "\x1b["


@pytest.fixture
def logging_state(monkeypatch):
    """Let a test call ``logs.setup`` and restore the loggers, warnings and progress it changes."""
    names = ("", "tlops", "mlflow", "alembic", "sqlalchemy.engine", "huey", *logs._NEVER_DEBUG)
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level, logging.getLogger(n).propagate)
        for n in names
    }
    monkeypatch.setattr(progress, "_reporter", progress.reporter())
    monkeypatch.setattr(logs, "_verbosity", logs.verbosity())
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logging, "_warnings_showwarning", getattr(logging, "_warnings_showwarning", None))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            yield
    finally:
        for n, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)  # also clears the loggers' cached levels


def _emit_one_of_each() -> None:
    logging.getLogger("tlops.runners.local").info("ingest: running (key %s)", "abc")
    logging.getLogger("tlops.runners.local").debug("a debug line")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("mlflow.models").warning("\x1b[31mmodel logged without a signature\x1b[0m")
    logging.getLogger("alembic.runtime").warning("alembic warning")
    warnings.warn("\x1b[1;33mAdd type hints\x1b[0m to `predict`", UserWarning, stacklevel=1)


def test_one_format_for_tlops_mlflow_and_warnings(logging_state, capsys):
    logs.setup("normal")
    _emit_one_of_each()
    lines = capsys.readouterr().err.splitlines()
    assert all(logs.LINE_RE.match(line) for line in lines), lines
    assert not any(ANSI in line for line in lines), lines
    body = [line[9:] for line in lines]  # without HH:MM:SS
    assert body[0] == "INFO    ingest: running (key abc)"  # tlops: no logger name
    assert body[1] == "WARNING mlflow.models: model logged without a signature"
    assert body[2] == "WARNING alembic.runtime: alembic warning"
    # a warning is one line, colour codes gone, without the source line Python appends
    assert body[3].startswith("WARNING ") and body[3].endswith("UserWarning: Add type hints to `predict`")
    assert len(lines) == 4  # MLflow's INFO chatter and tlops debug lines are hidden by default


def test_verbose_shows_debug_and_third_party_info(logging_state, capsys):
    logs.setup("verbose")
    _emit_one_of_each()
    body = [line[9:] for line in capsys.readouterr().err.splitlines()]
    assert "DEBUG   a debug line" in body
    assert "INFO    mlflow.store.db.utils: Creating initial MLflow database tables..." in body
    assert len(body) == 6


def test_quiet_shows_warnings_and_errors_only(logging_state, capsys):
    logs.setup("quiet")
    _emit_one_of_each()
    logging.getLogger("tlops.x").error("it failed")
    body = [line[9:] for line in capsys.readouterr().err.splitlines()]
    assert [b.split(" ", 1)[0] for b in body] == ["WARNING", "WARNING", "WARNING", "ERROR"]
    assert body[-1] == "ERROR   it failed"
    assert progress.reporter().enabled is False


def test_mlflow_configured_first_is_taken_over(logging_state, capsys):
    """MLflow installs its own handler and format when it is imported before setup."""
    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    _configure_mlflow_loggers("mlflow")
    assert logging.getLogger("mlflow").propagate is False
    logs.setup("normal")
    logging.getLogger("mlflow.tracking").warning("one line")
    err = capsys.readouterr().err
    assert err.count("one line") == 1 and err[9:] == "WARNING mlflow.tracking: one line\n", err


def test_mlflow_prints_become_log_lines(logging_state, capsys):
    """``eprint`` ("Successfully registered model") bypasses logging; it becomes an mlflow INFO line."""
    from mlflow.utils.logging_utils import eprint

    logs.setup("verbose")
    eprint("Successfully registered model 'x'.")
    eprint("Created version '1'", "of model 'x'.")
    assert [line[9:] for line in capsys.readouterr().err.splitlines()] == [
        "INFO    mlflow: Successfully registered model 'x'.",
        "INFO    mlflow: Created version '1' of model 'x'.",
    ]
    logs.setup("normal")
    eprint("Successfully registered model 'y'.")
    assert capsys.readouterr().err == ""


def test_setup_replaces_a_plain_console_handler(logging_state, capsys):
    """The KFP executor calls ``basicConfig`` (stdout) before tlops runs the step: one line, not two."""
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(sys.stdout))
    logs.setup("normal")
    logging.getLogger("tlops.kfp").info("fine-tune: running")
    out = capsys.readouterr()
    assert out.out == "" and out.err.endswith("INFO    fine-tune: running\n")


def _main(monkeypatch, *argv: str) -> int:
    from tlops import cli

    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    try:
        cli.main()
    except SystemExit as e:
        return e.code or 0
    return 0


def test_global_quiet_and_verbose_options(logging_state, monkeypatch, capsys):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    monkeypatch.delenv("TLOPS_DEBUG", raising=False)
    assert _main(monkeypatch, "--quiet", "steps") == 0
    assert logs.verbosity() == "quiet" and "ingest" in capsys.readouterr().out
    assert _main(monkeypatch, "-v", "steps") == 0 and logs.verbosity() == "verbose"
    assert _main(monkeypatch, "steps") == 0 and logs.verbosity() == "normal"
    monkeypatch.setenv(logs.LEVEL_ENV, "quiet")
    assert _main(monkeypatch, "steps") == 0 and logs.verbosity() == "quiet"
    capsys.readouterr()
    assert _main(monkeypatch, "--quiet", "--verbose", "steps") == 2
    assert "exclude each other" in capsys.readouterr().err


# --- kfp-local: task output captured per task ---------------------------------------------------


def test_kfp_task_output_goes_to_its_log_and_only_log_lines_to_stderr(tmp_path, logging_state, capsys):
    import json

    from kfp.local import subprocess_task_handler

    from tlops.kfp.pipeline import PROCESS_PREFIX, TASK_LOG, _kfp_local_output

    task_dir = tmp_path / "run" / "fine-tune"
    executor_input = json.dumps({"outputs": {"outputFile": str(task_dir / "executor_output.json")}})
    script = (
        "import os, sys; print('[KFP Executor 2026-01-01 INFO]: Got executor_input: {...}'); "
        "print('12:00:00 INFO    fine-tune: running (key abc)'); "
        f"print('level', os.environ['{logs.LEVEL_ENV}']); sys.exit(int(sys.argv[-1]))"
    )
    tasks: list = []
    for verbosity, code in (("normal", 0), ("verbose", 3)):
        logs.setup(verbosity)
        with _kfp_local_output(tasks, tmp_path):
            cmd = [sys.executable, "-c", script, "--executor_input", executor_input, str(code)]
            assert subprocess_task_handler.run_local_subprocess(cmd, {}) == code
        err = capsys.readouterr().err
        *output, process = (task_dir / TASK_LOG).read_text().splitlines(keepends=True)
        full = "".join(output)
        assert "Got executor_input" in full and f"level {verbosity}" in full
        # the log's last line is the parent's record of the task process (start, exit, code), not output
        assert process.startswith(PROCESS_PREFIX) and json.loads(process.removeprefix(PROCESS_PREFIX))["rc"] == code
        if verbosity == "normal":
            assert err == "12:00:00 INFO    fine-tune: running (key abc)\n"
        else:
            assert err == full  # --verbose: the whole task output
    assert [(path, rc) for path, rc, _ in tasks] == [(task_dir / TASK_LOG, 0), (task_dir / TASK_LOG, 3)]
    assert all(secs > 0 for *_, secs in tasks)

    # kfp.local's own root-logger lines: DEBUG (banners) or ERROR (a failed task), logger kfp.local
    from kfp.local import logging_utils

    logs.setup("normal")
    with _kfp_local_output(tasks, tmp_path), logging_utils.local_logger_context():
        logging.info("Executing task \x1b[96m'ingest'\x1b[0m")
        logging.error("Task \x1b[96m'pull-model'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m")
        logging_utils.print_horizontal_line()
    out = capsys.readouterr()
    assert out.out == "" and out.err[9:] == "ERROR   kfp.local: Task 'pull-model' finished with status FAILURE\n"
    assert subprocess_task_handler.run_local_subprocess.__name__ == "run_local_subprocess"  # restored


# --- a real run: every stderr line in the format ------------------------------------------------


def _count(text: str) -> int:
    return len(text.splitlines())


@pytest.mark.slow
def test_tlops_run_log_is_uniform_and_quiet_prints_only_the_summary(tmp_path):
    """A tiny ``tlops run``: stderr is log lines only (tlops, MLflow, warnings alike); the summary
    is on stdout. ``tlops --quiet run`` prints the summary and nothing else."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(tmp_path / "w")))
    env = {k: v for k, v in __import__("os").environ.items() if k not in (logs.LEVEL_ENV, "TLOPS_DEBUG")}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(TLOPS), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)

    proc = run("run", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if not logs.LINE_RE.match(line)] == [], proc.stderr
    assert ANSI not in proc.stderr
    assert any(" register: " in line for line in lines)
    assert "gates: passed" in proc.stdout and "strategy" in proc.stdout  # the summary: stdout

    quiet = run("--quiet", "run", "--config", str(cfg))
    assert quiet.returncode == 0, quiet.stderr
    assert [line for line in quiet.stderr.splitlines() if " INFO " in line or " DEBUG " in line] == []
    assert quiet.stderr == "" or all(logs.LINE_RE.match(line) for line in quiet.stderr.splitlines())
    summary = " ".join(quiet.stdout.split())  # rich wraps the summary at the console width
    assert "gates: passed" in summary and "(reused: ingest, pull-model" in summary, quiet.stdout


@pytest.mark.slow
def test_kfp_local_prints_what_in_process_prints(tmp_path):
    """kfp-local shows the same step lines as in-process, within 2x the line count; the KFP
    executor's chatter is in each task's log file."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in (logs.LEVEL_ENV, "TLOPS_DEBUG")}
    counts, step_lines = {}, {}
    for runner in ("local", "kfp-local"):
        cfg = tmp_path / f"{runner}.yaml"
        cfg.write_text(yaml.safe_dump(digits_config(tmp_path / runner)))
        proc = subprocess.run(
            [str(TLOPS), "run", "--config", str(cfg), "--runner", runner],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = proc.stdout + proc.stderr
        counts[runner] = _count(text)
        assert [line for line in proc.stderr.splitlines() if not logs.LINE_RE.match(line)] == [], proc.stderr
        step_lines[runner] = {line.split(" ", 2)[2].split(" (key")[0] for line in proc.stderr.splitlines()}
    assert counts["kfp-local"] <= 2 * counts["local"], counts
    for step in ("ingest", "pull-model", "extract-features", "fine-tune", "evaluate", "register"):
        assert f"{step}: running" in {s.strip() for s in step_lines["kfp-local"]}, step_lines["kfp-local"]
    run_dir = next((tmp_path / "kfp-local" / "kfp-local").iterdir())
    assert "KFP Executor" in (run_dir / "fine-tune" / "task.log").read_text()
