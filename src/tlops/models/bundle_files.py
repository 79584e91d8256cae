"""The bundle's on-disk marker and spec, without importing torch (fingerprints of reused steps use these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlops.errors import ModelError

BUNDLE_FILE = "bundle.json"


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def read_spec(d: Path) -> dict[str, Any]:
    if not is_bundle(d):
        raise ModelError(f"{d} is not a tlops model bundle (no {BUNDLE_FILE})")
    return json.loads((Path(d) / BUNDLE_FILE).read_text())
