"""One storage interface for local paths and ``s3://bucket/prefix`` URIs.

``storage_for(uri)`` returns a backend whose methods take full locations (local paths or
``s3://`` URIs) and behave the same for both:

- ``exists(uri)``, ``list(uri)`` (relative names of the files under a prefix/dir),
  ``delete(uri)`` (one object/file), ``delete_prefix(uri)``
- ``upload_file(local, uri)`` / ``download_file(uri, local)``
- ``upload_dir(local_dir, uri)``: every file, ``manifest.json`` LAST (readers trust only
  prefixes whose manifest exists); ``download_dir(uri, local_dir)`` refuses a prefix without
  a manifest and publishes the local copy atomically.
- ``download_prefix(uri, local_dir)``: a plain copy of everything under a prefix (input data).
- ``S3Storage.stamp(uri)``: cheap fingerprint (names, sizes, ETags) for step-reuse keys.

S3 settings come from the environment only:

- endpoint: ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, ...); default AWS.
- region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``).
- credentials: boto3's standard chain (env vars, profile, instance role). They are never
  logged, never written to manifests and never put in error messages.
- tuning (optional): ``TLOPS_S3_ATTEMPTS`` (whole-operation attempts, default 4),
  ``TLOPS_S3_BACKOFF`` (first backoff in seconds, default 0.5, doubled each retry, capped at
  8), ``TLOPS_S3_CLIENT_RETRIES`` (botocore's own retries per request, after the first try;
  default 2),
  ``TLOPS_S3_CONNECT_TIMEOUT`` / ``TLOPS_S3_READ_TIMEOUT`` (seconds, default 10 / 60),
  ``TLOPS_S3_MULTIPART_THRESHOLD`` / ``TLOPS_S3_MULTIPART_CHUNKSIZE`` (bytes, default 64 MiB /
  16 MiB; S3 requires parts of at least 5 MiB except the last).

Transient failures (connection errors, timeouts, HTTP 5xx, throttling) are retried with
exponential backoff; after the last attempt a :class:`tlops.errors.StorageError` names the
operation, the URI and the endpoint.

Local coordination: :func:`file_lock` is an exclusive advisory lock (``flock``) on a local
file. Concurrent runs use it so that one computes a step / cache entry and the others wait
and reuse it; the kernel releases it when the holder dies (``kill -9`` included), so a crashed
run never blocks the next one. It coordinates processes on one machine (or a filesystem with
working ``flock``); S3 has no locks: there, concurrent writers compute identical content and
publish it atomically (data first, manifest last).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from tlops.errors import StorageError
from tlops.redact import redact, safe_url

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
T = TypeVar("T")

MiB = 1024 * 1024
_THROTTLE_CODES = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def is_s3(uri: str | os.PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """Join path parts onto a local path or an ``s3://`` URI."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return Path(base).joinpath(*parts)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; expected s3://<bucket>/<prefix>")
    return bucket, key


def storage_for(uri: str | os.PathLike) -> "LocalStorage | S3Storage":
    return S3Storage() if is_s3(uri) else LocalStorage()


def _env_num(name: str, default: float, cast: Callable[[str], Any] = float) -> Any:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return cast(raw)
    except ValueError:
        raise StorageError(f"{name}={raw!r} is not a number") from None


# ---------------------------------------------------------------------- locks

_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (thread id, depth): re-entry by the holder is a no-op
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, what: str = "", wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Yields True when held. ``wait=False`` yields False at once if another process (or thread)
    holds it. While waiting, logs once what it waits for. Re-entrant within one thread."""
    p = Path(path)
    key = str(p.absolute())
    me = threading.get_ident()
    with _HELD_GUARD:
        owner = _HELD.get(key)
        if owner is not None and owner[0] == me:
            _HELD[key] = (me, owner[1] + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield True
        finally:
            with _HELD_GUARD:
                tid, depth = _HELD[key]
                _HELD[key] = (tid, depth - 1)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        held = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        if not held and wait:
            t0 = time.monotonic()
            log.info("waiting for %s (lock %s is held by another run)", what or p.name, p)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
            log.info("got %s after %.1fs", what or p.name, time.monotonic() - t0)
        if held:
            with _HELD_GUARD:
                _HELD[key] = (me, 1)
        try:
            yield held
        finally:
            if held:
                with _HELD_GUARD:
                    _HELD.pop(key, None)
    finally:
        os.close(fd)  # releases the flock


def is_locked(path: str | os.PathLike) -> bool:
    """True if another holder has the lock at ``path`` right now (a missing file: not locked)."""
    p = Path(path)
    if not p.exists():
        return False
    with file_lock(p, wait=False) as held:
        return not held


# ---------------------------------------------------------------------- local


class LocalStorage:
    """Local filesystem backend with the same semantics as :class:`S3Storage`."""

    endpoint = "local"

    def exists(self, uri: str | os.PathLike) -> bool:
        return Path(uri).exists()

    def list(self, uri: str | os.PathLike) -> list[str]:
        root = Path(uri)
        if root.is_file():
            return [root.name]
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def delete(self, uri: str | os.PathLike) -> None:
        p = Path(uri)
        if p.is_file():
            p.unlink()

    def delete_prefix(self, uri: str | os.PathLike) -> None:
        shutil.rmtree(uri, ignore_errors=True)

    def upload_file(self, local: str | os.PathLike, uri: str | os.PathLike) -> None:
        dst = Path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def download_file(self, uri: str | os.PathLike, local: str | os.PathLike) -> None:
        if not Path(uri).is_file():
            raise StorageError(f"cannot download {uri}: not found")
        self.upload_file(uri, local)

    def upload_dir(self, local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
        """Copy a finished artifact dir into place atomically (a concurrent writer's copy wins)."""
        from tlops.artifacts import publish_dir

        src = Path(local_dir)
        if not (src / MANIFEST).is_file():
            raise StorageError(f"cannot upload {src} to {uri}: it has no {MANIFEST} (not a finished artifact)")
        dst = Path(uri)
        if (dst / MANIFEST).is_file():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, staging)
            publish_dir(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def download_dir(self, uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
        src = Path(uri)
        if not (src / MANIFEST).is_file():
            raise StorageError(f"cannot download {uri}: no {MANIFEST} there (missing or unfinished artifact)")
        self.upload_dir(src, local_dir)

    def download_prefix(self, uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
        shutil.copytree(uri, local_dir, dirs_exist_ok=True)


# ---------------------------------------------------------------------- s3


class S3Storage:
    """boto3-backed backend for ``s3://bucket/prefix`` URIs (AWS, MinIO, moto)."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        attempts: int | None = None,
        backoff: float | None = None,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.endpoint_url = (
            endpoint_url or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.attempts = max(1, attempts if attempts is not None else _env_num("TLOPS_S3_ATTEMPTS", 4, int))
        self.backoff = backoff if backoff is not None else _env_num("TLOPS_S3_BACKOFF", 0.5)
        # botocore's ``max_attempts`` counts retries after the first request
        client_retries = max(0, _env_num("TLOPS_S3_CLIENT_RETRIES", 2, int))
        config = Config(
            connect_timeout=_env_num("TLOPS_S3_CONNECT_TIMEOUT", 10.0),
            read_timeout=_env_num("TLOPS_S3_READ_TIMEOUT", 60.0),
            retries={"max_attempts": client_retries, "mode": "standard"},
            # path-style works with every S3-compatible server (MinIO, moto, IP endpoints)
            s3={"addressing_style": "path"} if self.endpoint_url else {},
        )
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        threshold = multipart_threshold or _env_num("TLOPS_S3_MULTIPART_THRESHOLD", 64 * MiB, int)
        chunksize = multipart_chunksize or _env_num(
            "TLOPS_S3_MULTIPART_CHUNKSIZE", max(5 * MiB, min(16 * MiB, threshold)), int
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=4
        )
        self.endpoint = safe_url(self.client.meta.endpoint_url)

    # -- retry wrapper -------------------------------------------------------------

    @staticmethod
    def _classify(exc: BaseException) -> str:
        """'transient', 'missing', 'credentials' or 'fatal'."""
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return "credentials"
        if isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
            return "transient"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND_CODES or status == 404:
                return "missing"
            if status >= 500 or status == 429 or code in _THROTTLE_CODES:
                return "transient"
            return "fatal"
        if isinstance(exc, (S3UploadFailedError, S3TransferFailedError)):
            # boto3 wraps the real error in a message; classify by its text
            text = str(exc)
            if any(
                s in text
                for s in (
                    "Could not connect",
                    "Connection was closed",
                    "Read timeout",
                    "Connect timeout",
                    "(500)",
                    "(502)",
                    "(503)",
                    "(504)",
                    "SlowDown",
                    "Throttl",
                    "InternalError",
                )
            ):
                return "transient"
            if "NoSuchBucket" in text or "(404)" in text:
                return "missing"
            return "fatal"
        return "fatal"

    def _call(self, what: str, uri: str, fn: Callable[[], T], *, missing_ok: bool = False) -> T | None:
        """Run ``fn`` with bounded retries; ``what`` reads like 'upload features.npz to'."""
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                kind = self._classify(e)
                if kind == "missing":
                    if missing_ok:
                        return None
                    raise StorageError(redact(f"cannot {what} {uri}: not found ({self._short(e)})")) from None
                if kind == "credentials":
                    raise StorageError(
                        f"cannot {what} {uri}: no S3 credentials found for endpoint {self.endpoint}; set "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
                    ) from None
                if kind == "fatal":
                    raise StorageError(
                        redact(f"cannot {what} {uri}: endpoint {self.endpoint} refused it ({self._short(e)})")
                    ) from None
                last = e
                if attempt < self.attempts:
                    delay = min(8.0, self.backoff * 2 ** (attempt - 1))
                    log.warning(
                        "storage: %s %s failed (attempt %d/%d: %s); retrying in %.2fs",
                        what,
                        uri,
                        attempt,
                        self.attempts,
                        type(e).__name__,
                        delay,
                    )
                    time.sleep(delay)
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        down = isinstance(last, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)) or (
            last is not None and any(s in str(last) for s in ("Could not connect", "Connect timeout", "Read timeout"))
        )
        state = "unreachable" if down else "still failing"
        raise StorageError(
            redact(
                f"cannot {what} {uri}: endpoint {self.endpoint} {state} after {self.attempts} attempts "
                f"({self._short(last)})"
            )
        ) from None

    @staticmethod
    def _short(e: BaseException | None) -> str:
        if e is None:
            return "unknown error"
        text = " ".join(str(e).split())
        if len(text) > 300:
            text = text[:300] + "..."
        return f"{type(e).__name__}: {text}"

    # -- operations ----------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            return bool(self._list_keys(uri, limit=1))
        found = self._call("check", uri, lambda: self.client.head_object(Bucket=bucket, Key=key), missing_ok=True)
        return found is not None

    def _list_keys(self, uri: str, limit: int | None = None) -> list[str]:
        bucket, prefix = split_s3(uri)

        def go() -> list[str]:
            keys: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"])
                    if limit is not None and len(keys) >= limit:
                        return keys
            return keys

        return self._call("list", uri, go, missing_ok=True) or []

    def list(self, uri: str) -> list[str]:
        """Relative names of the objects under ``uri/`` (like files under a dir)."""
        base = uri.rstrip("/") + "/"
        _, prefix = split_s3(base)
        return sorted(k[len(prefix) :] for k in self._list_keys(base) if not k.endswith("/"))

    def stamp(self, uri: str) -> str:
        """Cheap fingerprint of an object or prefix (names, sizes, ETags; no downloads)."""
        from tlops.hashing import hash_json

        bucket, key = split_s3(uri)
        rows: list[list] = []
        if key and not key.endswith("/"):
            head = self._call("check", uri, lambda: self.client.head_object(Bucket=bucket, Key=key), missing_ok=True)
            if head is not None:
                return hash_json([key.rsplit("/", 1)[-1], head.get("ContentLength"), head.get("ETag")])
        base = uri.rstrip("/") + "/"
        _, prefix = split_s3(base)

        def go() -> None:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rows.append([obj["Key"][len(prefix) :], obj.get("Size"), obj.get("ETag")])

        self._call("list", base, go, missing_ok=True)
        return hash_json(sorted(rows)) if rows else "missing"

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call("delete", uri, lambda: self.client.delete_object(Bucket=bucket, Key=key), missing_ok=True)

    def delete_prefix(self, uri: str) -> None:
        base = uri.rstrip("/") + "/"
        bucket, _ = split_s3(base)
        keys = self._list_keys(base)
        # manifest first, so a half-deleted prefix is never trusted
        keys.sort(key=lambda k: (not k.endswith("/" + MANIFEST), k))
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete", base, lambda c=chunk: self.client.delete_objects(Bucket=bucket, Delete={"Objects": c}))

    def upload_file(self, local: str | os.PathLike, uri: str) -> None:
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"cannot upload {local} to {uri}: the URI names a prefix, not an object")
        name = Path(local).name
        self._call(
            f"upload {name} to",
            uri,
            lambda: self.client.upload_file(str(local), bucket, key, Config=self.transfer_config),
        )

    def download_file(self, uri: str, local: str | os.PathLike) -> None:
        """Download one object; the local file appears atomically (temp file + rename)."""
        bucket, key = split_s3(uri)
        dst = Path(local)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._call(
                "download",
                uri,
                lambda: self.client.download_file(bucket, key, str(tmp), Config=self.transfer_config),
            )
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_dir(self, local_dir: str | os.PathLike, uri: str) -> None:
        """Upload every file of a finished artifact dir, ``manifest.json`` last."""
        src = Path(local_dir)
        if not (src / MANIFEST).is_file():
            raise StorageError(f"cannot upload {src} to {uri}: it has no {MANIFEST} (not a finished artifact)")
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        if self._list_keys(uri.rstrip("/") + "/", limit=1):
            # Replacing an artifact: delete_prefix withdraws the old manifest first, so no reader
            # trusts a mix of old and new files.
            self.delete_prefix(uri)
        for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
            self.upload_file(src / rel, str(join(uri, rel)))

    def download_dir(self, uri: str, local_dir: str | os.PathLike) -> None:
        """Download a finished artifact prefix (refused without a manifest), atomically."""
        if not self.exists(str(join(uri, MANIFEST))):
            raise StorageError(f"cannot download {uri}: no {MANIFEST} there (missing or unfinished artifact)")
        dst = Path(local_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            self.download_prefix(uri, staging)
            if dst.exists():
                shutil.rmtree(dst)
            os.rename(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def download_prefix(self, uri: str, local_dir: str | os.PathLike) -> None:
        """Download every object under ``uri/`` into ``local_dir`` (keeping relative paths)."""
        root = Path(local_dir)
        names = self.list(uri)
        for rel in names:
            target = (root / rel).resolve()
            if not str(target).startswith(str(root.resolve())):
                raise StorageError(f"refusing to download {uri}/{rel}: the key escapes the target directory")
            self.download_file(str(join(uri, rel)), target)
