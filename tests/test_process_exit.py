"""tlops.process_exit: the collector's objects are frozen only in a process that ends next."""

from __future__ import annotations

import gc
import sys
import types

from tlops.process_exit import freeze_for_exit


def test_freezes_only_in_the_named_main_module_or_console_script(monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="kfp.dsl.executor_main")
    monkeypatch.setitem(sys.modules, "__main__", main)
    try:
        assert not freeze_for_exit(("tlops.__main__",)) and gc.get_freeze_count() == 0
        assert freeze_for_exit(("kfp.dsl.executor_main",)) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    main.__spec__ = None  # a console script runs as a plain file
    main.__file__ = "/opt/venv/bin/pytest"
    assert not freeze_for_exit(("tlops",), scripts=("tlops",)) and gc.get_freeze_count() == 0
    main.__file__ = "/opt/venv/bin/tlops"
    try:
        assert freeze_for_exit(("tlops",), scripts=("tlops",)) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_cli_called_in_process_freezes_nothing(monkeypatch, capsys):
    import pytest

    from tlops import cli

    monkeypatch.setattr(sys, "argv", ["tlops", "--version"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and "tlops" in capsys.readouterr().out
    assert gc.get_freeze_count() == 0
