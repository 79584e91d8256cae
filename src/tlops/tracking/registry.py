"""MLflow model registry: aliases, promotion with gate checks, rollback, champion lookup.

Aliases: ``challenger`` (the latest registration), ``champion`` (what serves), and
``previous-champion`` (what ``champion`` pointed at before the last promotion, so a rollback is
one command). Every promotion and rollback writes who/when/why on the version it moved
``champion`` to (tags ``tlops.promoted`` / ``tlops.rolled_back``) and appends a line to the
registered model's ``tlops.history`` tag.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from tlops.errors import TlopsError

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
VALIDATION_TAG, DIGEST_TAG, HISTORY_TAG = "validation_status", "tlops.model_digest", "tlops.history"
HISTORY_MAX_CHARS = 4000  # MLflow caps tag values (5000 chars on older servers); oldest lines go first


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def get_alias(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def versions(name: str) -> list:
    """All versions of a registered model (empty if it does not exist), lowest version first."""
    from mlflow.exceptions import MlflowException

    try:
        found = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda mv: int(mv.version))


def find_version_by_tag(name: str, key: str, value: str):
    """The lowest version of ``name`` whose tag ``key`` equals ``value``, or None."""
    return next((mv for mv in versions(name) if mv.tags.get(key) == value), None)


def settle_duplicate(name: str, version: str, digest: str) -> tuple[str, bool]:
    """After registering ``version`` with tag ``tlops.model_digest=digest``: keep one version per digest.

    Two registrations of the same model can both pass the "already registered?" check before
    either creates its version (two processes, or two KFP runs). Every version is created with its
    digest tag, so after creating one, the lowest version holding the digest wins: if it is not
    ours, ours is deleted and the winner reused. Works on any registry backend, no lock needed.
    Returns (version to use, whether an older version was reused).
    """
    same = [mv for mv in versions(name) if mv.tags.get(DIGEST_TAG) == digest]
    winner = str(same[0].version) if same else str(version)
    if int(winner) < int(version):
        client().delete_model_version(name, str(version))
        log.info(
            "register: %s v%s holds the same model (digest %s, registered concurrently): deleted v%s, reusing v%s",
            name,
            winner,
            digest[:12],
            version,
            winner,
        )
        return winner, True
    return str(version), False


def who() -> str:
    """The user recorded on promotions.

    Against a server with authentication, the identity the server authenticated
    (``MLFLOW_TRACKING_USERNAME``: the call that records it succeeded with that user, so it cannot
    be someone else's name); else ``TLOPS_USER`` (CI, pipelines), else the login name.
    """
    import getpass

    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("TLOPS_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _stamp(reason: str | None) -> str:
    """'<user> <UTC time> <reason>': the who/when/why of a registry change."""
    return f"{who()} {_now()} {reason or '(no reason given)'}"


def _append_history(name: str, line: str) -> None:
    rm = client().get_registered_model(name)
    lines = (rm.tags.get(HISTORY_TAG) or "").splitlines() + [line]
    while len(lines) > 1 and len("\n".join(lines)) > HISTORY_MAX_CHARS:
        lines.pop(0)
    client().set_registered_model_tag(name, HISTORY_TAG, "\n".join(lines)[-HISTORY_MAX_CHARS:])


# What each registry change needs on a server with tlops' auth app (tlops.tracking.auth_app).
NEEDS_MANAGE = "MANAGE on the registered model (the reviewer role)"
NEEDS_EDIT = "EDIT on the registered model"


@contextmanager
def _permission(action: str, name: str, needed: str) -> Iterator[None]:
    """Turn the server's 401/403 for ``action`` on model ``name`` into one line naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        status = e.get_http_status_code()
        if e.error_code == "PERMISSION_DENIED" or status == 403:
            raise TlopsError(
                f"permission denied: user '{who()}' may not {action} of registered model '{name}': needs {needed}"
            ) from None
        if e.error_code == "UNAUTHENTICATED" or status == 401:
            raise TlopsError(
                f"not authenticated to the tracking server (cannot {action} of '{name}'): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise


def _get_version(name: str, version: str, action: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version(name, str(version))
    except MlflowException as e:
        raise TlopsError(f"cannot {action} {name} version {version}: {e.message}") from None


def promote(name: str, version: str, *, reason: str | None = None, force: bool = False) -> dict[str, Any]:
    """Move ``champion`` to ``version``; the old champion stays reachable as ``previous-champion``.

    Refuses a version whose ``validation_status`` tag is not ``passed`` (its gates failed, or it
    was not registered by tlops) unless ``force``.
    """
    c = client()
    mv = _get_version(name, version, "promote")
    version = str(mv.version)
    status = mv.tags.get(VALIDATION_TAG)
    old = get_alias(name, CHAMPION)
    if old is not None and str(old.version) == version:
        return {"model": name, "champion": version, "previous": None, "changed": False, "forced": False}
    if status != "passed" and not force:
        shown = f"'{status}'" if status else "missing"
        raise TlopsError(
            f"refusing to promote {name} v{version}: validation_status is {shown}, not 'passed'; "
            "fix the model or promote anyway with --force"
        )
    forced = status != "passed"
    # the protected aliases first: without the reviewer's permission nothing below happens
    with _permission(f"move '{CHAMPION}'", name, NEEDS_MANAGE):
        if old is not None:
            c.set_registered_model_alias(name, PREVIOUS, old.version)
        c.set_registered_model_alias(name, CHAMPION, version)
    note = f" [forced: validation_status {status or 'missing'}]" if forced else ""
    stamp = _stamp(reason) + note
    with _permission("tag a version", name, NEEDS_EDIT):
        c.set_model_version_tag(name, version, "tlops.promoted", stamp)
        _append_history(
            name, f"promote v{version} (previous champion: {'v' + str(old.version) if old else 'none'}) by {stamp}"
        )
    return {
        "model": name,
        "champion": version,
        "previous": str(old.version) if old else None,
        "changed": True,
        "forced": forced,
    }


def rollback(name: str, *, reason: str | None = None) -> dict[str, Any]:
    """Swap ``champion`` and ``previous-champion`` (undo the last promotion)."""
    c = client()
    prev = get_alias(name, PREVIOUS)
    if prev is None:
        raise TlopsError(
            f"cannot roll back {name}: it has no '{PREVIOUS}' alias (nothing was promoted over another champion)"
        )
    cur = get_alias(name, CHAMPION)
    with _permission(f"move '{CHAMPION}'", name, NEEDS_MANAGE):
        c.set_registered_model_alias(name, CHAMPION, prev.version)
        if cur is not None:
            c.set_registered_model_alias(name, PREVIOUS, cur.version)
        else:
            c.delete_registered_model_alias(name, PREVIOUS)
    stamp = _stamp(reason)
    with _permission("tag a version", name, NEEDS_EDIT):
        c.set_model_version_tag(
            name, str(prev.version), "tlops.rolled_back", f"{stamp} (from v{cur.version})" if cur else stamp
        )
        _append_history(
            name, f"rollback to v{prev.version} (from {'v' + str(cur.version) if cur else 'no champion'}) by {stamp}"
        )
    return {"model": name, "champion": str(prev.version), "previous": str(cur.version) if cur else None}
