"""One log format for everything a tlops process writes to stderr.

tlops, MLflow, alembic, KFP and Python warnings all go through one handler on the root logger::

    15:25:53 INFO    ingest: running (key b61a5d913d80774b)
    15:25:48 WARNING mlflow.store.db.utils: ...
    15:26:07 WARNING /path/module.py:12: UserWarning: ...

tlops's own lines carry no logger name (the step names them); other libraries' lines start with
their logger name. Colour codes (MLflow, KFP, libraries that colour their warnings) are removed,
so a log file or a KFP pod log reads the same as a terminal. A message is one line: a warning
loses the source line Python appends to it; a traceback (``log.exception``) keeps its lines.

Verbosity (``tlops --quiet`` / ``tlops --verbose``, or ``TLOPS_LOG_LEVEL=quiet|normal|verbose`` in
the environment, which the kfp-local runner passes to its tasks):

- ``quiet``: warnings and errors only, no progress;
- ``normal``: tlops at INFO (step lines, epoch lines, progress), other libraries at WARNING;
- ``verbose``: everything at DEBUG, third-party chatter included (MLflow's database migrations,
  the KFP driver/launcher output of ``--runner kfp-local``).

Nothing here imports MLflow or torch: ``setup`` runs before every command, ``tlops --help``
included. MLflow is told not to install its own handler (``MLFLOW_CONFIGURE_LOGGING=false``);
when it was imported first, its loggers are handed back to the root handler here.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys

LEVEL_ENV = "TLOPS_LOG_LEVEL"
VERBOSITIES = ("quiet", "normal", "verbose")

DATEFMT = "%H:%M:%S"
#: what every line matches (tests and log scrapers use it)
LINE_RE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S")

_verbosity = "normal"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# loggers MLflow configures with its own handler and format when it is imported
_MLFLOW_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")
# third-party loggers that stay at INFO even with --verbose (their DEBUG lines are font lists, file polls)
_NEVER_DEBUG = ("matplotlib", "PIL", "filelock", "fsspec", "asyncio", "git", "h5py", "numexpr")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class Formatter(logging.Formatter):
    """``HH:MM:SS LEVEL   [logger: ]message``, without colour codes, one line per message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt=DATEFMT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = strip_ansi(record.message).strip("\n")
        if record.name == "py.warnings":
            # "file:line: Category: text\n  <source line>": the first line says it all
            message = message.split("\n", 1)[0]
        elif not (record.name == "tlops" or record.name.startswith("tlops.")):
            message = f"{record.name}: {message}"
        return self._style._fmt % {**record.__dict__, "message": message}

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream at setup):
    a rich progress bar redirects stderr while it is live, so log lines print above the bar
    instead of through it; pytest's capture sees the lines too."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it
        pass


def _replaceable(handler: logging.Handler) -> bool:
    """Ours from an earlier setup, or a plain console handler another library's ``basicConfig``
    put there (the KFP executor's, on stdout): both would print every line a second time."""
    if isinstance(handler, StderrHandler):
        return True
    std = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return type(handler) is logging.StreamHandler and handler.stream in std


def verbosity_from_env() -> str:
    if os.environ.get("TLOPS_DEBUG") == "1":
        return "verbose"
    value = os.environ.get(LEVEL_ENV, "normal").strip().lower()
    return value if value in VERBOSITIES else "normal"


def setup(verbosity: str | None = None) -> str:
    """Configure logging, warnings and progress for this process (idempotent); returns the verbosity.

    ``None`` reads ``TLOPS_LOG_LEVEL`` (``TLOPS_DEBUG=1``: verbose). A runner that starts tlops
    subprocesses passes ``subprocess_env()`` on, so they log the same way."""
    global _verbosity
    from tlops import progress

    verbosity = verbosity or verbosity_from_env()
    if verbosity not in VERBOSITIES:
        raise ValueError(f"verbosity {verbosity!r}; allowed: {', '.join(VERBOSITIES)}")
    _verbosity = verbosity
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"  # read when mlflow is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    root = logging.getLogger()
    for h in [h for h in root.handlers if _replaceable(h)]:
        root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(Formatter())
    root.addHandler(handler)

    for name in _MLFLOW_LOGGERS:  # mlflow imported before setup: undo its own handler and format
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
        lg.setLevel(logging.NOTSET)

    if verbosity == "verbose":
        root.setLevel(logging.DEBUG)
        logging.getLogger("tlops").setLevel(logging.DEBUG)
        for name in _NEVER_DEBUG:
            logging.getLogger(name).setLevel(logging.INFO)
    else:
        root.setLevel(logging.WARNING)  # libraries: warnings and errors
        logging.getLogger("tlops").setLevel(logging.WARNING if verbosity == "quiet" else logging.INFO)
        for name in _NEVER_DEBUG:
            logging.getLogger(name).setLevel(logging.NOTSET)

    # re-captured each time: something (pytest's warning recorder, catch_warnings) may have put its
    # own showwarning in place since the last setup, which captureWarnings(True) alone would keep
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    _route_mlflow_prints()
    progress.configure(enabled=verbosity != "quiet")
    return verbosity


# --- MLflow's bare prints ------------------------------------------------------------------------
# ``mlflow.utils.logging_utils.eprint`` ("Successfully registered model 'x'.", "Created version
# '1' of model 'x'.") prints to MLFLOW_LOGGING_STREAM, bypassing logging. Its write() is turned
# into INFO lines of the ``mlflow`` logger, as soon as that module exists (an import hook: setup
# must not import MLflow itself).

_MLFLOW_STREAM_MODULE = "mlflow.utils.logging_utils"


def _patch_mlflow_stream(module: object) -> None:
    stream = getattr(module, "MLFLOW_LOGGING_STREAM", None)
    if stream is None or getattr(stream, "_tlops_logging", False):
        return
    logger = logging.getLogger("mlflow")
    pending: list[str] = []

    def write(text: str) -> int:
        pending.append(text)
        if "\n" in text:
            lines = "".join(pending).split("\n")
            pending[:] = [lines.pop()]
            for line in lines:
                if line.strip():
                    logger.info("%s", line)
        return len(text)

    stream.write = write  # instance attributes shadow the class's methods for every caller
    stream.flush = lambda: None
    stream._tlops_logging = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches MLflow's print stream right after ``mlflow.utils.logging_utils`` is executed."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib's protocol
        if name != _MLFLOW_STREAM_MODULE:
            return None
        sys.meta_path.remove(self)  # one module, once: find the real spec without this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):  # noqa: ANN001
            exec_module(module)
            _patch_mlflow_stream(module)

        loader.exec_module = exec_and_patch
        return spec


def _route_mlflow_prints() -> None:
    module = sys.modules.get(_MLFLOW_STREAM_MODULE)
    if module is not None:
        _patch_mlflow_stream(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def verbosity() -> str:
    """The verbosity ``setup`` chose last (``normal`` before any)."""
    return _verbosity


def subprocess_env() -> dict[str, str]:
    """Environment entries that make a tlops subprocess log like this process."""
    return {LEVEL_ENV: _verbosity}
