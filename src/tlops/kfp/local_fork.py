"""kfp.local task processes forked from one that has already imported the tasks' libraries.

kfp.local's ``SubprocessRunner`` starts every task as ``sh -ec <kfp's launcher script> <component
source> --executor_input ... --function_to_execute ...``: a fresh interpreter, which then imports
torch, MLflow and scikit-learn again, seconds per task on 2 cores (``bench/results/runners.md``).
Here the same task, kfp's own ``kfp.dsl.executor_main`` on the same component source and executor
input, runs in a process forked by the standard library's forkserver (``multiprocessing``, with
``set_forkserver_preload``), which imported those libraries once (:mod:`tlops.kfp.preload`).
Only the launch changes: each task still has a process of its own, with the environment and
working directory it would have had, its output on a pipe read line by line, its exit status
(negative when a signal ended it, as ``subprocess`` reports it), and kfp.local reads its outputs
as before. A command of another shape (a kfp release whose launcher script differs) is not
recognised and runs with ``sh`` as kfp.local would run it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PRELOAD = "tlops.kfp.preload"
EXECUTOR_MODULE = "kfp.dsl.executor_main"


@functools.lru_cache(maxsize=None)
def launcher_script(python: str) -> str | None:
    """The ``sh`` script kfp puts in front of a lightweight component, as kfp.local runs it
    (``python3`` replaced by ``python``); None if this kfp release builds it differently."""
    try:
        from kfp.dsl import component_factory
        from kfp.local import subprocess_task_handler

        def probe() -> None: ...

        command, _ = component_factory._get_command_and_args_for_lightweight_component(probe)
        script = subprocess_task_handler.replace_python_executable(command, python)[2]
    except Exception as e:  # a kfp release without these internals: every task runs with sh
        log.debug("kfp-local: launching tasks with sh (kfp's launcher script not found: %s)", e)
        return None
    return script if EXECUTOR_MODULE in script else None


def parse(full_command: list[str]) -> tuple[str, list[str]] | None:
    """(component source, executor arguments) of a kfp.local lightweight-component command, or None
    when the command is not exactly kfp's launcher with this interpreter."""
    script = launcher_script(sys.executable)
    if script is None or len(full_command) < 4 or full_command[:2] != ["sh", "-ec"] or full_command[2] != script:
        return None
    return full_command[3], list(full_command[4:])


def _context():
    return multiprocessing.get_context("forkserver")


def start() -> bool:
    """Start the forkserver now (a no-op when it runs), so that its imports overlap with whatever the
    caller does before the first task; False where there is no forkserver (not POSIX)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    _context().set_forkserver_preload([PRELOAD])
    forkserver.ensure_running()
    return True


def run(full_command: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> int | None:
    """Run a kfp.local task command in a forked, preloaded process: each output line (stdout and
    stderr together) goes to ``on_line``; returns the exit status, or None when the command is not
    one this can run (the caller starts it with ``sh`` instead)."""
    parsed = parse(full_command)
    if parsed is None or not start():
        return None
    source, args = parsed
    ours, theirs = socket.socketpair()
    with ours:
        proc = _context().Process(target=_task, args=(source, args, env, theirs), name="kfp-local task")
        proc.start()
        theirs.close()
        try:
            with ours.makefile("r", encoding="utf-8", errors="replace", newline="\n") as lines:
                for line in lines:
                    on_line(line)
        finally:
            proc.join()
    return proc.exitcode


def _task(source: str, args: list[str], env: dict[str, str], out: socket.socket) -> None:
    """In the forked process: what kfp's launcher script does (the component source into a new
    temporary directory, ``_KFP_RUNTIME=true python -m kfp.dsl.executor_main
    --component_module_path <file> <args>``), with stdout and stderr on ``out``."""
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.environ["_KFP_RUNTIME"] = "true"
    path = Path(tempfile.mkdtemp(), "ephemeral_component.py")
    path.write_text(source, encoding="utf-8")
    sys.argv = [EXECUTOR_MODULE, "--component_module_path", str(path), *args]
    import runpy

    code = 0
    try:
        runpy.run_module(EXECUTOR_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter does: the traceback, then the status of SIGINT
        traceback.print_exc()
        _exit_handlers()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit_handlers()
    sys.exit(code)


def _exit_handlers() -> None:
    """What an interpreter runs on its way out (``atexit``, flushed streams): the forkserver's child
    ends with ``os._exit``, which skips them."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
