"""MLflow model registry: log + register a version, aliases, promotion, champion lookup."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tlops.errors import TlopsError

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def get_alias(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version_by_tag(name: str, key: str, value: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for mv in versions:
        if mv.tags.get(key) == value:
            return mv
    return None


@contextmanager
def champion_bundle(name: str) -> Iterator[tuple[Any, Path] | None]:
    """Yield (model version, local bundle dir) of the current champion, or None."""
    import mlflow

    mv = get_alias(name, CHAMPION)
    if mv is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp))
        bundles = [p.parent for p in local.rglob("bundle.json")]
        yield (mv, bundles[0]) if bundles else None


def promote(name: str, version: str, *, reason: str | None = None) -> dict[str, Any]:
    """Move ``champion`` to ``version``; the old champion stays reachable as ``previous-champion``."""
    import getpass
    import time

    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_model_version(name, str(version))
    except MlflowException as e:
        raise TlopsError(f"cannot promote {name} version {version}: {e.message}") from None
    old = get_alias(name, CHAMPION)
    if old is not None and str(old.version) == str(version):
        return {"model": name, "champion": str(version), "previous": None, "changed": False}
    if old is not None:
        c.set_registered_model_alias(name, PREVIOUS, old.version)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_model_version_tag(name, str(version), "tlops.promoted", f"{getpass.getuser()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason or ''}".strip())
    return {"model": name, "champion": str(version), "previous": str(old.version) if old else None, "changed": True}
