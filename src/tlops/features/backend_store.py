"""The layout of the store of exported and quantised backbones (``<workdir>/cache/backends``),
readable without torch so that ``tlops gc`` can prune it:

::

    <store>/<key[:2]>/<key>/   one export: model.onnx or model.xml + model.bin, and entry.json
    <store>/.locks/<key>.lock  held while the entry is written, and while gc removes it
    <store>/auto/<key>.json    ``features.backend: auto`` decisions (small; gc leaves them)

``entry.json`` names the model digest and backend an entry was made for: gc keeps an entry while a
kept run's features were extracted from that model.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

ENTRY = "entry.json"


def entry_dir(store: str | os.PathLike, key: str) -> Path:
    return Path(store) / key[:2] / key


def lock_path(store: str | os.PathLike, key: str) -> Path:
    return Path(store) / ".locks" / f"{key}.lock"


def write_entry(d: Path, model_digest: str, backend: str) -> None:
    """``d/entry.json``, atomically (written before the model file appears)."""
    tmp = d / f".{ENTRY}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"model_digest": model_digest, "backend": backend}))
    os.replace(tmp, d / ENTRY)


def entry_model(d: Path) -> str | None:
    """The model digest an entry was made for; None when it has no readable ``entry.json``."""
    try:
        return str(json.loads((d / ENTRY).read_text())["model_digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
