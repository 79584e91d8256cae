"""Retention: ``tlops gc --keep N`` prunes old runs and what only they used, safely.

What a workdir accumulates, and what gc does with it:

- ``runs/<run-id>/``: one dir per pipeline run. The ``N`` newest (by start time) are kept,
  and so is every run in progress (it holds ``runs/<id>/.lock``; a dir that has no
  ``config.yaml`` yet and is younger than an hour counts as starting). The others are
  removed: renamed to a hidden ``runs/.gc-*`` name first (atomic), then deleted.
- leftovers of killed steps inside kept runs (``.<step>.tmp-*``, ``.old-*``, ``.reuse-*``).
- ``index/<step>/<fingerprint>``: reuse pointers. One whose artifact is gone (or goes now)
  is removed; the runner points the index at the newest copy, so kept runs keep reuse working.
- ``checkpoints/<fingerprint>/``: resumable fine-tune checkpoints. Removed when that step has
  a finished artifact (nothing left to resume), or when it is older than the oldest kept run
  (an abandoned crash); never while its step lock is held (training in progress).
- the local feature cache (``cache/features`` or ``--cache-dir``): an entry is removed when no
  kept run references it (the features artifacts list their ``cache_keys``), and only while gc
  holds that entry's lock, so an entry a run is computing or reading is never removed (gc
  skips it and says so). Killed writers' hidden staging dirs are removed the same way.
- exported / quantised backbones (``cache/backends``, ``features.backend`` other than torch): an
  entry is removed when no kept run pulled or extracted features with its model (the pull-model
  and features artifacts record ``model_digest``, each entry its own in ``entry.json``), under that entry's lock as
  above; an entry without ``entry.json`` is removed only when it is older than the oldest kept
  run. ``auto``'s small decision files stay.

Files of finished artifacts are hard links shared between runs and the cache, so "bytes
freed" counts a file only when gc removes all of its links. The MLflow store
(``mlflow.db``, ``mlartifacts/``) is not touched: registered models are MLflow's business.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tlops.artifacts import MANIFEST, is_finished
from tlops.errors import ConfigError
from tlops.storage import file_lock, is_locked, is_s3
from tlops.workdir import RUN_LOCK, Workdir

log = logging.getLogger(__name__)

STARTING_GRACE_S = 3600
_LEFTOVER = (".tmp-", ".old-", ".reuse-")


@dataclass
class Item:
    kind: str  # run, leftover, index, checkpoints, cache-entry, cache-staging, backend-model, backend-staging
    path: Path
    reason: str
    bytes: int = 0  # bytes this deletion frees (files whose every link goes)


@dataclass
class Report:
    workdir: Path
    dry_run: bool
    kept_runs: list[str] = field(default_factory=list)
    deleted: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(i.bytes for i in self.deleted)

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        out = [f"{verb} {i.kind:13} {i.path}  ({human(i.bytes)}; {i.reason})" for i in self.deleted]
        out += [f"skipped {i.kind:13} {i.path}  ({i.reason})" for i in self.skipped]
        out.append(f"kept {len(self.kept_runs)} run(s): {', '.join(self.kept_runs) or '-'}")
        out.append(
            f"{'would free' if self.dry_run else 'freed'} {human(self.freed)} ({self.freed} bytes) "
            f"in {len(self.deleted)} item(s){' [dry run: nothing deleted]' if self.dry_run else ''}"
        )
        return out


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _started(run: Path) -> float:
    cfg = run / "config.yaml"
    return (cfg if cfg.exists() else run).stat().st_mtime


def _newest_mtime(d: Path) -> float:
    t = d.stat().st_mtime
    for p in d.rglob("*"):
        try:
            t = max(t, p.lstat().st_mtime)
        except FileNotFoundError:
            pass
    return t


def referenced_keys(run: Path) -> set[str]:
    """The feature cache keys a run's extract-features artifact used."""
    from tlops.features.cache import cache_key

    mf = run / "extract-features" / MANIFEST
    if not mf.is_file():
        return set()
    meta = json.loads(mf.read_text()).get("metadata", {})
    keys = set(meta.get("cache_keys") or [])
    if meta.get("cache_key"):
        keys.add(meta["cache_key"])
    for c in meta.get("source_ranking") or []:  # artifacts written before cache_keys existed
        if "model_digest" in c and "preprocessing" in c and meta.get("dataset_hash"):
            keys.add(cache_key(c["model_digest"], c["preprocessing"], meta["dataset_hash"] + ":train"))
    return keys


def referenced_models(run: Path) -> set[str]:
    """The model digests a run pulled and extracted features with: what its backend models were
    exported from. pull-model's are there before extraction starts, so a run still extracting
    keeps the entries it may be reading."""
    digests: set[object] = set()
    for step in ("pull-model", "extract-features"):
        try:
            meta = json.loads((run / step / MANIFEST).read_text()).get("metadata") or {}
        except (OSError, ValueError):
            continue
        digests.add(meta.get("model_digest"))
        for c in (meta.get("candidates") or []) + (meta.get("source_ranking") or []):
            digests.add(c.get("model_digest") if isinstance(c, dict) else None)
    return {d for d in digests if isinstance(d, str) and d}


def _backend_models(root: Path, wanted: set[str], oldest_kept: float) -> list[tuple[Item, Path | None]]:
    """Entries of the backend store no kept run uses, and killed exporters' staging dirs, each with
    the entry lock gc must hold to remove it (None: an interrupted gc's leftover, no lock)."""
    from tlops.features.backend_store import entry_model, lock_path

    out: list[tuple[Item, Path | None]] = []
    for shard in sorted(root.iterdir()) if root.is_dir() else []:
        if not shard.is_dir() or len(shard.name) != 2:  # .locks, auto
            continue
        for e in sorted(p for p in shard.iterdir() if p.is_dir()):
            if e.name.startswith(".gc-"):
                out.append((Item("leftover", e, "interrupted gc"), None))
                continue
            lock = lock_path(root, e.name)
            owner = entry_model(e)
            if owner in wanted or (owner is None and _newest_mtime(e) >= oldest_kept):
                out += [  # an exporter's temp dir or file, or an interrupted gc's: nothing else starts with "."
                    (Item("backend-staging", p, "left by an interrupted export"), lock)
                    for p in sorted(e.iterdir())
                    if p.name.startswith(".")
                ]
            elif owner is None:
                out.append((Item("backend-model", e, "no entry.json, older than the kept runs"), lock))
            else:
                out.append((Item("backend-model", e, "its model is not used by a kept run"), lock))
    return out


def _files(paths: list[Path]) -> list[os.stat_result]:
    out = []
    for root in paths:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if not p.is_dir():
                out.append(st)
    return out


def _size_freed(items: list[Item]) -> None:
    """Set each item's ``bytes``: sizes of the files whose every hard link is being deleted."""
    per_item = [_files([i.path]) for i in items]
    links = Counter((st.st_dev, st.st_ino) for sts in per_item for st in sts)
    counted: set[tuple[int, int]] = set()
    for item, sts in zip(items, per_item, strict=True):
        n = 0
        for st in sts:
            ident = (st.st_dev, st.st_ino)
            if ident not in counted and links[ident] >= st.st_nlink:
                counted.add(ident)
                n += st.st_size
        item.bytes = n


def _remove(path: Path) -> None:
    """Rename aside (atomic: nothing half-deleted keeps its name), then delete."""
    if not path.exists():
        return
    trash = path.parent / f".gc-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def collect(
    workdir: str | os.PathLike, keep: int, *, cache_dir: str | os.PathLike | None = None, dry_run: bool = False
) -> Report:
    """Prune ``workdir`` down to the ``keep`` newest runs (see the module doc); return what was done."""
    if keep < 0:
        raise ConfigError(f"--keep: got {keep}; expected 0 or more runs to keep")
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ConfigError(f"--workdir: {workdir} is not a directory (expected a tlops workdir such as .tlops)")
    if cache_dir is not None and is_s3(str(cache_dir)):
        raise ConfigError(
            f"--cache-dir: {cache_dir} is on S3; gc prunes local caches only (S3 has no locks to make it "
            "safe against running pipelines); use a bucket lifecycle rule there"
        )
    rep = Report(workdir, dry_run)
    wd = Workdir(workdir)
    now = time.time()

    # -- runs
    runs_dir = wd.runs
    runs = sorted(
        (d for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) if runs_dir.is_dir() else [],
        key=_started,
        reverse=True,
    )
    active = {
        d
        for d in runs
        if is_locked(d / RUN_LOCK) or (not (d / "config.yaml").exists() and now - d.stat().st_mtime < STARTING_GRACE_S)
    }
    kept = runs[:keep] + [d for d in runs[keep:] if d in active]
    rep.kept_runs = [d.name for d in kept]
    doomed: list[Item] = [Item("run", d, f"older than the {keep} newest run(s)") for d in runs if d not in kept]
    if runs_dir.is_dir():
        doomed += [Item("leftover", d, "interrupted gc") for d in runs_dir.iterdir() if d.name.startswith(".gc-")]
    for d in kept:
        if d in active:
            continue  # its temp dirs may be live
        doomed += [
            Item("leftover", p, "left by an interrupted step")
            for p in d.iterdir()
            if p.name.startswith(".") and any(m in p.name for m in _LEFTOVER)
        ]
    gone_runs = {i.path.resolve() for i in doomed if i.kind == "run"}

    def in_gone_run(p: Path) -> bool:
        rp = p.resolve()
        return any(r == rp or r in rp.parents for r in gone_runs)

    # -- reuse index
    finished_fps: set[str] = set()
    index = wd.index
    for f in sorted(index.glob("*/*")) if index.is_dir() else []:
        if f.name.startswith("."):
            if f.name.endswith(".tmp") and now - f.stat().st_mtime > 60:
                doomed.append(Item("index", f, "stale temp file"))
            continue
        target = Path(f.read_text().strip())
        if not is_finished(target):
            doomed.append(Item("index", f, "its artifact is gone"))
        elif in_gone_run(target):
            doomed.append(Item("index", f, "its artifact goes with a pruned run"))
        else:
            finished_fps.add(f.name)

    # -- resumable checkpoints
    oldest_kept = min((_started(d) for d in kept), default=now)
    ckpts = wd.checkpoints
    for d in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        locks = wd.step_locks(d.name)
        if any(is_locked(lk) for lk in locks):
            rep.skipped.append(Item("checkpoints", d, "its step is running"))
        elif d.name in finished_fps:
            doomed.append(Item("checkpoints", d, "its step finished"))
        elif _newest_mtime(d) < oldest_kept:
            doomed.append(Item("checkpoints", d, "abandoned: older than the kept runs"))

    # -- feature cache
    from tlops.features.cache import FeatureCache

    root = Path(cache_dir) if cache_dir is not None else wd.feature_cache
    cache = FeatureCache(root)
    wanted: set[str] = set()
    for d in kept:
        wanted |= referenced_keys(d)
    locked: list[tuple[Item, Path | None]] = []  # what goes only while gc holds the entry's lock (local: a Path)
    for shard in sorted(root.iterdir()) if root.is_dir() else []:
        if not shard.is_dir() or shard.name.startswith("."):
            continue
        for e in sorted(shard.iterdir()):
            if e.name.startswith(".gc-"):
                doomed.append(Item("leftover", e, "interrupted gc"))
            elif e.name.startswith("."):
                key = e.name.lstrip(".").split(".")[0]
                locked.append((Item("cache-staging", e, "left by an interrupted writer"), cache.lock_path(key)))
            elif e.name not in wanted:
                reason = "not used by a kept run" if is_finished(e) else "unfinished entry"
                locked.append((Item("cache-entry", e, reason), cache.lock_path(e.name)))

    # -- exported backbones
    models: set[str] = set()
    for d in kept:
        models |= referenced_models(d)
    for item, lock in _backend_models(wd.backend_models, models, oldest_kept):
        if lock is None:
            doomed.append(item)
        else:
            locked.append((item, lock))

    # -- lock what goes (a run or cache entry in use is skipped), size it, delete it
    with contextlib.ExitStack() as held:
        go: list[Item] = []
        for item in doomed:
            lock = item.path / RUN_LOCK if item.kind == "run" else None
            if lock is not None and lock.exists() and not held.enter_context(file_lock(lock, wait=False)):
                rep.skipped.append(Item("run", item.path, "in progress (run lock held)"))
                continue
            go.append(item)
        for item, lock in locked:
            if not held.enter_context(file_lock(lock, wait=False)):  # type: ignore[arg-type]
                item.reason = "in use by a running pipeline (entry lock held)"
                rep.skipped.append(item)
                continue
            go.append(item)
        _size_freed(go)  # all deletions together: a file counts once all its links go
        for item in go:
            if not dry_run:
                _remove(item.path)
            rep.deleted.append(item)
            log.info(
                "gc: %s %s %s (%s)", "would delete" if dry_run else "deleted", item.kind, item.path, human(item.bytes)
            )
    return rep
