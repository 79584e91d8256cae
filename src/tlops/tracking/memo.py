"""Registry reads remembered with a stamp of the store, so an unchanged rerun needs no MLflow.

The step keys read the registry (the version an ``mlflow:`` alias resolves to, the current
champion), and so do pre-flight and ``register``'s "is there anything to write?". Importing MLflow
and opening its store costs more than the rest of a fully reused run, and those answers change
only when the store changes. So for a store that is a local SQLite file (the embedded
``<workdir>/mlflow.db``, any ``sqlite:///`` URI) the answers are kept in
``<workdir>/registry-memo.json`` together with a stamp of the file: size, mtime_ns and SQLite's
file change counter (bytes 24-27 of the file header, bumped by every committed write in
rollback-journal mode) of the database, and size and mtime_ns of a ``-wal`` / ``-journal``
sibling. SQLite's file format is stable; MLflow's schema is never read.

A remembered answer is used only while the stamp is unchanged: any write to the store (another
run, ``tlops promote``, a user with the MLflow client) invalidates all of them, and the next read
goes to MLflow as before. Remote stores (``http(s)://``, ``databricks``, ``file:``) have no
stamp: every read goes to MLflow.

The answers are written once, at the end of a run that used MLflow (after its MLflow run is
closed, so after its last write): every question asked in this process or remembered before is
asked again, between two stamps of the store; when the stamps differ (something wrote meanwhile)
nothing is written. Answers taken before a run's own writes are therefore never remembered.

Questions (tuples, JSON-able):

- ``("resolve", "models:/NAME@ALIAS")`` or ``("resolve", "models:/NAME/VERSION")``: what
  :func:`tlops.models.sources.resolve_mlflow` returns (None: it does not resolve);
- ``("alias", NAME, ALIAS)``: ``{"version", "run_id", "digest"}`` of the version, or None;
- ``("digest", NAME, DIGEST)``: the lowest version holding the model digest, or None;
- ``("state", NAME, VERSION)``: the version's tags, description, run and experiment, and the
  registered model's aliases (what ``register`` would write, to see that it is there already).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlops.config import PipelineConfig

log = logging.getLogger(__name__)

MEMO_FILE = "registry-memo.json"
MAX_ANSWERS = 256  # questions carried from run to run (one pipeline asks a handful)
MISS = object()  # :func:`cached`: no valid remembered answer
_HEADER_COUNTER = slice(24, 28)  # SQLite file header: file change counter

# questions asked of MLflow in this process, per memo file, to remember at the end of the run
_asked: dict[Path, set[tuple]] = {}


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def store_stamp(uri: str) -> list | None:
    """A cheap stamp of a SQLite store that changes with every write to it (None: no stamp)."""
    db = sqlite_file(uri)
    if db is None:
        return None
    try:
        with db.open("rb") as f:
            header = f.read(100)
        st = db.stat()
    except OSError:
        return None
    stamp: list = [st.st_size, st.st_mtime_ns, header[_HEADER_COUNTER].hex()]
    for suffix in ("-wal", "-journal"):
        side = db.with_name(db.name + suffix)
        try:
            s = side.stat()
        except OSError:
            continue
        stamp.append([suffix, s.st_size, s.st_mtime_ns])
    return stamp


def memo_path(cfg: "PipelineConfig") -> Path:
    return cfg.workdir_path / MEMO_FILE


def _key(question: tuple) -> str:
    return json.dumps(list(question))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("answers"), dict) else None


def cached(cfg: "PipelineConfig", question: tuple) -> Any:
    """The remembered answer to ``question`` if the store is unchanged since it was taken, else :data:`MISS`."""
    from tlops.tracking.setup import tracking_uri

    uri = tracking_uri(cfg)
    data = _load(memo_path(cfg))
    if data is None or data.get("uri") != uri or _key(question) not in data["answers"]:
        return MISS
    stamp = store_stamp(uri)
    if stamp is None or stamp != data.get("stamp"):
        return MISS
    return data["answers"][_key(question)]


def note(cfg: "PipelineConfig", *questions: tuple) -> None:
    """Remember to answer ``questions`` at the end of this run (:func:`save`)."""
    _asked.setdefault(memo_path(cfg), set()).update(questions)


def asked(cfg: "PipelineConfig") -> bool:
    """Whether this process asked MLflow anything for ``cfg``'s memo since the last :func:`save`."""
    return bool(_asked.get(memo_path(cfg)))


def lookup(cfg: "PipelineConfig", question: tuple) -> Any:
    """The answer to ``question``: remembered while the store is unchanged, else asked of MLflow
    (through :func:`tlops.tracking.setup.configure`, as the steps did before) and noted for :func:`save`."""
    found = cached(cfg, question)
    if found is not MISS and (found is not None or question[0] != "resolve"):
        return found  # (an unresolvable reference is asked again: resolving raises the registry's own message)
    from tlops.tracking import setup

    setup.configure(cfg)
    note(cfg, question)
    return ask(question, strict=True)


def ask(question: tuple, *, strict: bool = False) -> Any:
    """Ask MLflow (the store this process points at). ``strict``: an unresolvable ``resolve``
    raises its :class:`~tlops.errors.ModelError` instead of answering None."""
    from tlops.tracking import registry

    kind, *args = question
    if kind == "resolve":
        from tlops.errors import ModelError
        from tlops.models import sources

        try:
            return sources.resolve_mlflow(args[0])
        except ModelError:
            if strict:
                raise
            return None
    if kind == "alias":
        mv = registry.get_alias(*args)
        if mv is None:
            return None
        return {
            "version": str(mv.version),
            "run_id": getattr(mv, "run_id", None),
            "digest": (getattr(mv, "tags", None) or {}).get(registry.DIGEST_TAG),
        }
    if kind == "digest":
        mv = registry.find_version_by_tag(args[0], registry.DIGEST_TAG, args[1])
        return None if mv is None else str(mv.version)
    if kind == "state":
        return _state(*args)
    raise ValueError(f"unknown registry question {question!r}")


def _state(name: str, version: str) -> dict[str, Any] | None:
    from mlflow.exceptions import MlflowException

    from tlops.tracking import registry

    c = registry.client()
    try:
        mv = c.get_model_version(name, str(version))
        aliases = c.get_registered_model(name).aliases or {}
        run = c.get_run(mv.run_id) if mv.run_id else None
    except MlflowException:
        return None
    return {
        "tags": dict(mv.tags or {}),
        "description": mv.description or "",
        "run_id": mv.run_id,
        "experiment_id": run.info.experiment_id if run else None,
        "aliases": {a: str(v) for a, v in aliases.items()},
    }


def save(cfg: "PipelineConfig") -> bool:
    """At the end of a run that used MLflow: answer every question asked in this process or
    remembered before, between two stamps of the store, and remember the answers if the stamps
    agree (else forget them all). Returns whether answers were written."""
    from tlops.tracking.setup import tracking_uri, use_store

    path = memo_path(cfg)
    questions = _asked.pop(path, set())
    uri = tracking_uri(cfg)
    before = store_stamp(uri)
    if before is None:
        path.unlink(missing_ok=True)
        return False
    old = _load(path)
    if old is not None and old.get("uri") == uri:
        questions |= {tuple(json.loads(k)) for k in old["answers"]}
    ordered = sorted(questions, key=_key)[:MAX_ANSWERS]
    use_store(uri)
    try:
        answers = {_key(q): ask(q) for q in ordered}
    except Exception as e:  # noqa: BLE001 - the memo is an optimisation: never fail a finished run over it
        log.warning("registry memo not written (%s: %s): the next run asks MLflow", type(e).__name__, e)
        path.unlink(missing_ok=True)
        return False
    if store_stamp(uri) != before:  # written to meanwhile: the answers may be older than the stamp
        path.unlink(missing_ok=True)
        return False
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"uri": uri, "stamp": before, "answers": answers}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return True
