"""Bad usage of any ``tlops`` command is a usage error (exit 2, the command's usage line), never a traceback.

Walks every command of the real app and runs it through ``tlops.cli.main`` (what the console
script runs), not through typer's ``CliRunner``, which would hide a bug in ``main``'s error handling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from tlops import cli

TLOPS = Path(sys.executable).parent / "tlops"


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield path, cmd
        return
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def _cases():
    """(id, argv) per command: unknown option, option without its value, wrong type / extra argument."""
    cases = []
    for path, cmd in _commands(typer.main.get_command(cli.app)):
        name = " ".join(path)
        options = [p for p in cmd.params if p.opts[0].startswith("-")]
        takes_args = any(not p.opts[0].startswith("-") for p in cmd.params)
        cases.append((f"{name}: unknown option", [*path, "--no-such-option"]))
        valued = [p for p in options if not p.is_flag and not p.count]
        if valued:
            cases.append((f"{name}: missing value", [*path, valued[-1].opts[0]]))
        numeric = [p for p in options if p.type_descriptor.annotation in (int, float)]
        if numeric:
            cases.append((f"{name}: wrong type", [*path, numeric[0].opts[0], "not-a-number"]))
        if not takes_args:
            cases.append((f"{name}: extra argument", [*path, "stray"]))
    return cases


CASES = _cases()


def test_the_walk_covers_every_kind_of_bad_usage():
    kinds = {cid.split(": ")[1] for cid, _ in CASES}
    assert kinds == {"unknown option", "missing value", "wrong type", "extra argument"}
    assert sum(cid.endswith("wrong type") for cid, _ in CASES) >= 3  # gc --keep, schedule, runs list --limit
    assert {cid.split(":")[0] for cid, _ in CASES} >= {"run", "demo", "compile", "step", "export dvc", "runs get"}


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_usage_is_a_usage_error(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    text = out.out + out.err
    assert exc.value.code == 2, text
    assert "Usage: tlops " in text and "Traceback" not in text, text


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["demo", "--bogus", "X"]])
def test_console_script_prints_usage_not_traceback(argv, tmp_path):
    proc = subprocess.run([str(TLOPS), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Usage: tlops " in proc.stderr and "No such option" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.splitlines()) < 10


# --- --workdir and --version -------------------------------------------------------------------

WORKDIR_COMMANDS = {"run", "demo", "validate", "step", "export dvc", "promote", "compare", "rollback", "gc", "predict"}
WORKDIR_COMMANDS |= {"serve"}
WORKDIR_COMMANDS |= {"monitor"}
WORKDIR_COMMANDS |= {"tune"}
WORKDIR_COMMANDS |= {"adapt"}


def test_every_command_that_uses_a_workdir_takes_workdir():
    opts = {
        " ".join(path): {o for p in cmd.params for o in p.opts}
        for path, cmd in _commands(typer.main.get_command(cli.app))
    }
    assert WORKDIR_COMMANDS <= set(opts)
    assert [name for name in sorted(WORKDIR_COMMANDS) if "--workdir" not in opts[name]] == []
    # and only those: the others never touch a workdir (KFP server, compile, summary of a run dir)
    assert sorted(n for n, o in opts.items() if "--workdir" in o) == sorted(WORKDIR_COMMANDS)


def _cfg(tmp_path: Path) -> Path:
    import yaml
    from conftest import digits_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(digits_config(tmp_path / "from-config")))
    return path


def _main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tlops", *argv])
    try:
        cli.main()
    except SystemExit as e:
        return e.code or 0
    return 0


def test_workdir_option_overrides_the_config(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    assert _main(monkeypatch, "validate", "--config", str(cfg), "--workdir", "yes") == 0
    assert "\nworkdir: 'yes'\n" in capsys.readouterr().out
    # the value is a path even when YAML would read it as a bool; --workdir wins over --set workdir=
    assert _main(monkeypatch, "validate", "-c", str(cfg), "--set", "workdir=a", "--workdir", "yes") == 0
    assert "\nworkdir: 'yes'\n" in capsys.readouterr().out


def test_run_and_demo_use_the_workdir_option(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tlops.demo
    import tlops.report
    import tlops.runners.local

    seen = {}
    passed = SimpleNamespace(artifact=lambda step: SimpleNamespace(meta={"gates_passed": True}))

    def run_pipeline(cfg, **kw):
        seen["run"] = cfg.workdir
        return passed

    monkeypatch.setattr(tlops.runners.local, "run_pipeline", run_pipeline)
    monkeypatch.setattr(tlops.report, "print_run_summary", lambda cfg, result: None)
    monkeypatch.setattr(tlops.demo, "run_demo", lambda src, tgt, overrides: seen.setdefault("demo", overrides))
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    assert _main(monkeypatch, "run", "--config", str(cfg), "--workdir", str(tmp_path / "w")) == 0
    assert seen["run"] == str(tmp_path / "w")
    assert _main(monkeypatch, "demo", "--workdir", "w2", "--set", "seed=1") == 0
    assert seen["demo"] == ["seed=1", 'workdir="w2"']


def test_version_prints_tlops_git_commit_and_library_versions(tmp_path):
    from importlib import metadata

    import tlops

    proc = subprocess.run([str(TLOPS), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(cli.__file__).parents[2], capture_output=True, text=True
    )
    assert lines[0].startswith(f"tlops {tlops.__version__} (git {head.stdout.strip()}"), lines[0]
    assert lines[1].startswith("python 3.")
    for lib, line in zip(cli.KEY_LIBRARIES, lines[2:], strict=True):
        assert line == f"{lib} {metadata.version(lib)}"


def test_version_uses_the_commit_recorded_at_build_time(monkeypatch, capsys):
    monkeypatch.setenv("TLOPS_GIT_COMMIT", "0123abc")
    assert _main(monkeypatch, "--version") == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("(git 0123abc)")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--runner", "argo"), "--runner: got 'argo'; allowed: local, kfp-local"),
        (
            ("--runner", "kfp-local", "--task-processes", "spawn"),
            "--task-processes: got 'spawn'; allowed: forked, fresh",
        ),
    ],
)
def test_run_names_the_allowed_runners_and_task_processes(tmp_path, monkeypatch, capsys, option, message):
    monkeypatch.chdir(tmp_path)
    assert _main(monkeypatch, "run", "--config", str(_cfg(tmp_path)), *option) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "from-config").exists()  # nothing started: no workdir, no run
