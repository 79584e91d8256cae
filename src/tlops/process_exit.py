"""A faster exit for processes that are about to end: skip the collector's walk over every object.

Importing torch, timm and MLflow leaves about half a million live objects; the collections the
interpreter runs while it shuts down walked them all, which cost seconds per process
(bench/results/runners-*.md: the exit phase of each kfp-local task). ``gc.freeze`` moves them to
the permanent generation first, so those collections skip them; ``atexit`` handlers still run and the
standard streams are still flushed. It is only right in a process that exits next: in one that goes
on (a test calling the CLI or a task in-process) frozen objects would never be collected, so the
caller names the ``__main__`` modules (or console scripts) that mean "this process ends here".
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path


def freeze_for_exit(main_modules: tuple[str, ...], scripts: tuple[str, ...] = ()) -> bool:
    """``gc.freeze()`` when ``__main__`` is one of ``main_modules`` (run with ``python -m``) or the
    process is one of the console ``scripts``; True when it froze."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    script = Path(getattr(main, "__file__", None) or "").name  # a console script runs as a plain file
    if name in main_modules or (name is None and script in scripts):
        gc.freeze()
        return True
    return False
