"""Stable content hashes for files, directories, arrays and JSON-able objects."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode())


def hash_file(path: str | os.PathLike, h: "hashlib._Hash | None" = None) -> str:
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest() if own else ""


def iter_files(root: Path, exclude: Iterable[str] = ()) -> list[Path]:
    excl = set(exclude)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in excl)


def hash_dir(root: str | os.PathLike, exclude: Iterable[str] = ()) -> str:
    """Hash of every file's relative path and bytes under ``root``."""
    root = Path(root)
    h = hashlib.sha256()
    for p in iter_files(root, exclude):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        hash_file(p, h)
        h.update(b"\0")
    return h.hexdigest()


def hash_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def stat_fingerprint(root: str | os.PathLike) -> str:
    """Cheap fingerprint of a file or tree: relative paths, sizes and mtimes (no reads)."""
    root = Path(root)
    if root.is_file():
        st = root.stat()
        return hash_json([root.name, st.st_size, st.st_mtime_ns])
    rows = []
    for p in iter_files(root):
        st = p.stat()
        rows.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return hash_json(rows)
