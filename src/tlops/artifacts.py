"""Directory artifacts with a ``manifest.json``, written atomically.

A step writes into a hidden temporary sibling directory and renames it into place only
after the manifest is written, so a killed step never leaves a directory that a later
step would trust. Readers trust a directory only if its manifest exists.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tlops import __version__
from tlops.errors import ArtifactError
from tlops.hashing import hash_file, hash_json, iter_files

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

# Facts about one execution, not about what it made: wall-clock timings and the identity of the
# run that made an artifact. They stay in the files and the manifest (a user reads them there) but
# are left out of the content hash, wherever they occur in the metadata or in a JSON file, so two
# runs that make the same thing give it the same hash and every later step can reuse the first's.
RUN_FACTS = frozenset({"seconds", "train_seconds", "created_at", "run_id", "reused"})
# Top-level metadata keys that say where an input came from, not what it is: the content they name
# is hashed through another field (a dataset's files and data_hash, a model's source_digest), so a
# no-op rename of a data path keeps every later step reusable.
PROVENANCE_KEYS = frozenset({"source"})
# Files of an artifact kind that no later step consumes and that carry timings: resumption state
# (checkpoints hold the training history with its epoch seconds) and renderings of hashed JSON.
UNHASHED_FILES: dict[str, tuple[str, ...]] = {
    "trained-models": ("models/*/checkpoints/*",),
    "evaluation": ("report.md",),
}


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"tlops": __version__, "python": platform.python_version()}
    for pkg in ("torch", "timm", "transformers", "mlflow", "scikit-learn", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


@dataclass
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})


def read_artifact(path: str | os.PathLike, kind: str | None = None) -> Artifact:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a finished tlops artifact (no {MANIFEST}); rerun the step that produces it")
    manifest = json.loads(mf.read_text())
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{path} is a '{manifest.get('kind')}' artifact, expected '{kind}'")
    return Artifact(path, manifest)


def is_finished(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def write_artifact(
    out: str | os.PathLike,
    kind: str,
    *,
    config: Any = None,
    inputs: dict[str, Artifact] | None = None,
    overwrite: bool = True,
) -> Iterator["ArtifactWriter"]:
    """Yield a writer for a temp dir; on success write the manifest and rename into ``out``.

    On any exception the temp dir is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writer = ArtifactWriter(tmp, kind, config, inputs or {})
    try:
        yield writer
        writer._finish()
        if not overwrite and out.exists():
            raise ArtifactError(f"{out} already exists")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.path = out


class ArtifactWriter:
    def __init__(self, path: Path, kind: str, config: Any, inputs: dict[str, Artifact]):
        self.path = path
        self.kind = kind
        self.config = config
        self.inputs = inputs
        self.metadata: dict[str, Any] = {}
        self.content_hash: str | None = None
        self.manifest: dict[str, Any] = {}

    def _finish(self) -> None:
        content_hash = self.content_hash or content_hash_of(self.path, self.kind, self.metadata)
        self.manifest = {
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            "content_hash": content_hash,
            "inputs": {k: {"kind": a.kind, "content_hash": a.content_hash} for k, a in self.inputs.items()},
            "config": self.config,
            "metadata": self.metadata,
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_manifest(self.path, self.manifest)


def _without_run_facts(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_run_facts(v) for k, v in obj.items() if k not in RUN_FACTS}
    if isinstance(obj, list):
        return [_without_run_facts(v) for v in obj]
    return obj


def content_hash_of(path: Path, kind: str, metadata: dict[str, Any]) -> str:
    """What a later step consumes from an artifact: every file's relative path and bytes (a JSON
    file by its parsed value without :data:`RUN_FACTS`; :data:`UNHASHED_FILES` skipped) and the
    metadata without run facts and :data:`PROVENANCE_KEYS`. Environment records (threads, ISA,
    GPU) live outside ``metadata`` in the manifest and are not hashed either."""
    skip = UNHASHED_FILES.get(kind, ())
    h = hashlib.sha256()
    for p in iter_files(path, exclude=[MANIFEST]):
        rel = p.relative_to(path).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in skip):
            continue
        h.update(rel.encode() + b"\0")
        value = None
        if p.suffix == ".json":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                value = json.loads(p.read_text())
        if value is None:
            hash_file(p, h)
        else:
            h.update(b"json:" + hash_json(_without_run_facts(value)).encode())
        h.update(b"\0")
    meta = {k: v for k, v in metadata.items() if k not in PROVENANCE_KEYS}
    h.update(b"metadata:" + hash_json(_without_run_facts(meta)).encode())
    return h.hexdigest()


def publish(tmp: Path, out: Path, *, replace: bool = True) -> None:
    """Move the finished directory ``tmp`` to ``out`` with renames only: a reader sees the old
    ``out`` or the new one, never a mix, and a crash leaves at most a hidden sibling behind.

    ``replace``: an existing ``out`` is renamed aside, the new one renamed in, the old removed.
    Else (content-addressed caches) an existing finished ``out`` wins: someone published the
    same content first, so ``tmp`` is dropped; an unfinished one is replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if is_finished(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if not out.exists():
                raise
        # an unfinished dir (no manifest: a half-deleted entry) is never trusted: replace it
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(src: Path, dst: Path) -> None:
    """Publish a cache entry (see :func:`publish`; an entry already there wins)."""
    publish(src, dst, replace=False)


def copy_artifact(src: Path, out: Path) -> Artifact:
    """Place a copy of the finished artifact ``src`` at ``out`` (hard links where possible),
    staged in a hidden sibling and checked before it is published: a copy that fails half-way
    (e.g. ``tlops gc`` removed ``src`` meanwhile) is never trusted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.reuse-{uuid.uuid4().hex[:8]}"
    try:
        link_or_copy_tree(src, tmp)
        read_artifact(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_artifact(out)


def set_step_key(art: Artifact, key: str, environment: dict[str, Any] | None = None) -> None:
    """Record the step key ``art`` was made under in its manifest, and the numerical environment it
    was made in (``tlops.runtime_env.record``; not part of the content hash). The manifest is a
    new file renamed over the old one: it may be a hard link shared with other copies."""
    if art.manifest.get("step_key") == key and (environment is None or art.manifest.get("environment") == environment):
        return
    art.manifest["step_key"] = key
    if environment is not None:
        art.manifest["environment"] = environment
    _write_manifest(art.path, art.manifest)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    # Key order is kept as written (no sort_keys): mappings such as the trained models are in
    # config order, and a step reading the manifest from disk must see the order the writer saw.
    tmp = path / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path / MANIFEST)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link a file (cheap; files of finished artifacts are never modified), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree using hard links where possible (cheap reuse of finished artifacts)."""
    shutil.copytree(src, dst, copy_function=link_or_copy)
