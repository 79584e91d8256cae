"""Safe extraction of data archives (``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz``, ``.tar.bz2``, ``.tar.xz``).

``data.source`` may point at an archive of an image folder (or of one data file). Archives come
from outside, so every member is checked *before* anything is written:

* no absolute paths, drive letters or ``..`` components (path traversal: ``../x``, ``/etc/x``);
* tar: no device files or FIFOs; symlinks and hardlinks only to targets inside the archive;
* zip: no symlink entries at all (zipfile would write the link text as a file anyway);
* total declared size and member count are bounded (zip/tar bombs), see ``MAX_BYTES`` / ``MAX_MEMBERS``.

Then extraction itself runs with tarfile's ``filter="data"`` (which re-checks all of the above)
and, for zip, member by member to an explicitly resolved path inside the destination.
A refused archive raises ``DataError`` naming the archive, the member and why; nothing of it
stays on disk (the caller extracts into a temporary directory that it removes).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from tlops.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_BYTES = int(os.environ.get("TLOPS_MAX_ARCHIVE_BYTES", str(20 * 2**30)))  # 20 GiB uncompressed
MAX_MEMBERS = int(os.environ.get("TLOPS_MAX_ARCHIVE_MEMBERS", "2000000"))
_JUNK = ("__MACOSX",)  # resource-fork folders macOS adds to zips: never a class


def is_archive(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(ARCHIVE_SUFFIXES) and Path(path).is_file()


def _refuse(archive: Path, member: str, why: str) -> DataError:
    return DataError(
        f"data.source: refusing to extract {archive}: member {member!r} {why}; "
        "tlops only extracts regular files and folders that stay inside the archive root. "
        "Re-create the archive from the data folder itself "
        "(e.g. cd data && zip -r ../data.zip . / tar czf ../data.tgz .)"
    )


def _check_name(archive: Path, name: str) -> str:
    """The member's relative POSIX path, or a DataError for traversal / absolute names."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or raw.startswith("//"):
        raise _refuse(archive, name, "has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(archive, name, "escapes the target directory (path traversal with '..')")
    if "\x00" in raw:
        raise _refuse(archive, name, "has a NUL byte in its name")
    return "/".join(parts)


def _check_link(archive: Path, name: str, rel: str, target: str, hard: bool) -> None:
    target = target.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise _refuse(archive, name, f"is a {'hard' if hard else 'symbolic '}link to an absolute path ({target})")
    # hardlink targets are relative to the archive root, symlink targets to the link's folder
    base = "" if hard else posixpath.dirname(rel)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        raise _refuse(
            archive, name, f"is a {'hard' if hard else 'symbolic '}link pointing outside the archive ({target})"
        )


def _check_tar(archive: Path, tf: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    if len(members) > MAX_MEMBERS:
        raise DataError(
            f"data.source: {archive} has {len(members)} members (limit {MAX_MEMBERS}, TLOPS_MAX_ARCHIVE_MEMBERS)"
        )
    total = 0
    for m in members:
        rel = _check_name(archive, m.name)
        if m.issym() or m.islnk():
            _check_link(archive, m.name, rel, m.linkname, hard=m.islnk())
        elif not (m.isfile() or m.isdir()):
            raise _refuse(archive, m.name, "is a device file, FIFO or other special file")
        total += max(m.size, 0)
    if total > MAX_BYTES:
        raise DataError(
            f"data.source: {archive} would extract to {total} bytes (limit {MAX_BYTES}, TLOPS_MAX_ARCHIVE_BYTES)"
        )
    return members


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise DataError(
                f"data.source: {archive} has {len(infos)} members (limit {MAX_MEMBERS}, TLOPS_MAX_ARCHIVE_MEMBERS)"
            )
        total = 0
        checked = []
        seen: set[str] = set()
        for info in infos:
            rel = _check_name(archive, info.filename)
            if rel in seen and not info.is_dir():
                raise _refuse(archive, info.filename, "appears twice (a later copy would overwrite the first)")
            seen.add(rel)
            if _zip_is_symlink(info):
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, info.filename, rel, target, hard=False)
                raise _refuse(archive, info.filename, f"is a symbolic link ({target}); zip symlinks are not supported")
            total += info.file_size
            checked.append((info, rel))
        if total > MAX_BYTES:
            raise DataError(
                f"data.source: {archive} would extract to {total} bytes (limit {MAX_BYTES}, TLOPS_MAX_ARCHIVE_BYTES)"
            )
        root = dest.resolve()
        for info, rel in checked:
            if not rel:
                continue
            target = (root / rel).resolve()
            if root != target and root not in target.parents:  # belt and braces after _check_name
                raise _refuse(archive, info.filename, "escapes the target directory")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = _check_tar(archive, tf)
        try:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4: our own checks above are all there is
                tf.extractall(dest, members=members)
        except tarfile.FilterError as e:
            raise _refuse(
                archive, getattr(getattr(e, "tarinfo", None), "name", "?"), f"was refused by tarfile ({e})"
            ) from None


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract ``archive`` into the existing empty directory ``dest``, safely; return the data root.

    The data root is ``dest``, or the single top-level folder when the archive wraps everything
    in one (``data/cat/*.png``, ``data/dog/*.png``)."""
    archive, dest = Path(archive), Path(dest)
    try:
        if archive.name.lower().endswith(".zip"):
            if not zipfile.is_zipfile(archive):
                raise DataError(f"data.source: {archive} is not a zip archive (truncated or mislabelled); re-create it")
            _extract_zip(archive, dest)
        else:
            _extract_tar(archive, dest)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(
            f"data.source: cannot extract {archive} ({type(e).__name__}: {e}); the archive is corrupt or truncated"
        ) from None
    for junk in _JUNK:
        shutil.rmtree(dest / junk, ignore_errors=True)
    return data_root(dest)


def data_root(dest: Path) -> Path:
    root = dest
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(entries) == 1 and len(dirs) == 1 and any(c.is_dir() for c in dirs[0].iterdir()):
            root = dirs[0]  # one wrapper folder holding the class folders
            continue
        files = [p for p in entries if p.is_file()]
        if not dirs and len(files) == 1:
            return files[0]  # an archive of one data file (csv/tsv/npz)
        return root
