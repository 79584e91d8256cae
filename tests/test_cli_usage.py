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


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["demo", "--workdir", "X"]])
def test_console_script_prints_usage_not_traceback(argv, tmp_path):
    proc = subprocess.run([str(TLOPS), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Usage: tlops " in proc.stderr and "No such option" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.splitlines()) < 10
