"""DVC-versioned input: resolve ``data.dvc`` (repo, rev, path) through ``dvc.api``.

``resolve`` pins the reference to an exact git commit and the DVC md5 of the data without
downloading any data (cheap enough for the ingest fingerprint); ``fetch`` downloads that exact
version from the repo's DVC remote (S3, MinIO, ...). Remote credentials come from the usual
environment (``AWS_*``, ``AWS_ENDPOINT_URL``) or the repo's DVC config, never from tlops config.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tlops.config import DvcRef
from tlops.errors import DataError
from tlops.redact import redact, safe_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DvcVersion:
    repo: str  # credential-free
    rev: str  # the exact git commit
    rev_requested: str | None
    path: str
    md5: str  # DVC's md5 (ends in ".dir" for a directory)
    size: int | None
    nfiles: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_local(repo: str) -> bool:
    return "://" not in repo and not (":" in repo and "@" in repo.split(":", 1)[0])


def _open(ref: DvcRef):
    from dvc.api import DVCFileSystem

    rev = ref.rev
    if rev is None and _is_local(ref.repo):
        rev = "HEAD"  # never the working tree: uncommitted data has no version to record
    if _is_local(ref.repo) and not Path(ref.repo).exists():
        raise DataError(f"data.dvc.repo: {ref.repo} does not exist")
    try:
        fs = DVCFileSystem(ref.repo, rev=rev, remote=ref.remote)
        return fs, fs.repo.get_rev()  # the repo opens lazily: surface a bad rev or URL here
    except Exception as e:  # dvc raises many types: unknown rev, not a repo, clone failure
        raise DataError(
            f"data.dvc: cannot open {safe_url(ref.repo)} at rev {ref.rev or 'HEAD'}: {_reason(e)}"
        ) from None


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return redact(msg)


def resolve(ref: DvcRef) -> DvcVersion:
    """The exact commit and DVC md5 that ``ref`` names (no data is downloaded)."""
    fs, commit = _open(ref)
    try:
        try:
            info = fs.info(ref.path)
        except FileNotFoundError:
            raise DataError(f"data.dvc.path: {ref.path} not found in {safe_url(ref.repo)} at {commit[:12]}") from None
        md5 = info.get("md5") or (info.get("dvc_info") or {}).get("md5")
        if not md5:
            raise DataError(
                f"data.dvc.path: {ref.path} in {safe_url(ref.repo)} is not tracked by DVC "
                f"(run `tlops data version {ref.path}` in that repo, or point data.source at a plain path)"
            )
        meta = (info.get("dvc_info") or {}).get("entry")
        nfiles = getattr(getattr(meta, "meta", None), "nfiles", None)
        return DvcVersion(safe_url(ref.repo), commit, ref.rev, ref.path, md5, info.get("size"), nfiles)
    finally:
        fs.close()


def fetch(ref: DvcRef, dest: Path) -> DvcVersion:
    """Download the data ``ref`` names to ``dest`` (a file or a directory) and return its version."""
    version = resolve(ref)
    pinned = ref.model_copy(update={"rev": version.rev})
    fs, _ = _open(pinned)
    log.info("ingest: fetching %s (%s) from %s @ %s", ref.path, version.md5, version.repo, version.rev[:12])
    try:
        if fs.isdir(ref.path):
            fs.get(ref.path, str(dest), recursive=True)
        else:
            fs.get_file(ref.path, str(dest))
    except Exception as e:
        raise DataError(
            f"data.dvc: cannot download {ref.path} ({version.md5}) from the DVC remote of "
            f"{version.repo} @ {version.rev[:12]}: {_reason(e)}. Was it pushed (`dvc push`), and are "
            "the remote's credentials (AWS_* env vars) and endpoint (AWS_ENDPOINT_URL or the "
            "remote's endpointurl) set?"
        ) from None
    finally:
        fs.close()
    return version
