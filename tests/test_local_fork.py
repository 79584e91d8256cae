"""kfp-local task processes forked from the preloaded forkserver: the same task as kfp.local's own
launcher would start (environment, working directory, output, exit status), with the libraries
already imported; a command of another shape still runs with ``sh``."""

# no `from __future__ import annotations`: kfp reads the component function's annotations as types

import json
import signal

import pytest

from tlops import logs
from tlops.kfp import local_fork
from tlops.kfp.pipeline import PROCESS_PREFIX, TASK_LOG, _kfp_local_output, init_kfp_local


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local on ``tmp_path/root`` with tlops's task launch; yields (run a component, task records)."""
    from tests.conftest import digits_config
    from tlops.config import validate_config

    monkeypatch.chdir(tmp_path)
    root = init_kfp_local(validate_config(digits_config(tmp_path / "w")))
    tasks: list = []

    def run(component, fork=True, **kwargs):
        with _kfp_local_output(tasks, root, fork=fork):
            return component(**kwargs)

    logs.setup("normal")
    yield run, tasks


def _component():
    from kfp import dsl

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def probe(what: str) -> str:
        import os
        import sys

        print("probe:", os.getcwd(), os.environ.get("TLOPS_FORK_PROBE"), "torch" in sys.modules, flush=True)
        if what == "fail":
            raise ValueError("told to fail")
        if what == "term":
            os.kill(os.getpid(), 15)
        return what.upper()

    return probe


def _record(path):
    *output, last = path.read_text().splitlines()
    return output, json.loads(last.removeprefix(PROCESS_PREFIX))


def test_a_kfp_task_runs_forked_with_the_parents_env_and_cwd_and_libraries_loaded(kfp_local, tmp_path, monkeypatch):
    run, tasks = kfp_local
    monkeypatch.setenv("TLOPS_FORK_PROBE", "from-the-parent")  # after the forkserver started: passed per task
    assert run(_component(), what="ok").output == "OK"
    ((path, rc, _),) = tasks
    output, record = _record(path)
    assert path.name == TASK_LOG and rc == 0 and record["forked"] is True and record["rc"] == 0
    assert f"probe: {tmp_path} from-the-parent True" in output  # torch preloaded in the task process


def test_fresh_task_processes_are_new_interpreters(kfp_local, tmp_path):
    """``tlops run --runner kfp-local --task-processes fresh``: sh and a new interpreter, as kfp.local starts it."""
    run, tasks = kfp_local
    assert run(_component(), fork=False, what="ok").output == "OK"
    ((path, rc, _),) = tasks
    output, record = _record(path)
    assert rc == 0 and record["forked"] is False
    assert f"probe: {tmp_path} None False" in output  # nothing preloaded


def test_a_failing_forked_task_reports_its_exception_and_status(kfp_local):
    run, tasks = kfp_local
    with pytest.raises(RuntimeError, match="FAILURE"):
        run(_component(), what="fail")
    ((path, rc, _),) = tasks
    output, record = _record(path)
    assert rc == 1 and record == record | {"rc": 1, "forked": True}
    assert output[-1] == "ValueError: told to fail" and "Traceback (most recent call last):" in output


def test_a_forked_task_ended_by_a_signal_has_the_signal_status(kfp_local):
    run, tasks = kfp_local
    with pytest.raises(RuntimeError, match="FAILURE"):
        run(_component(), what="term")
    ((_, rc, _),) = tasks
    assert rc == -signal.SIGTERM  # as subprocess reports a process a signal ended


def test_only_kfps_own_launcher_is_forked():
    import sys

    from kfp.dsl import component_factory
    from kfp.local.subprocess_task_handler import replace_python_executable

    def f() -> None: ...

    command, args = component_factory._get_command_and_args_for_lightweight_component(f)

    full = replace_python_executable([*command, *args], sys.executable)
    assert local_fork.parse(full) == (command[3], args)  # (the component source, the executor's arguments)
    assert local_fork.parse(["sh", "-ec", full[2] + "echo changed\n", *full[3:]]) is None
    assert local_fork.parse([*command, *args]) is None  # python3 not this interpreter: kfp.local did not run it
    assert local_fork.parse([sys.executable, "-c", "print(1)"]) is None
