"""Users and grants on a ``tlops-auth`` tracking server, and promotion as the reviewer.

The compose runner (``tlops export compose``) runs its MLflow server with authentication like
``k8s/base/mlflow.yaml``; nobody is there to type the set-up of docs/security.md, so two one-shot
services do it with the passwords from the environment (a gitignored ``.env``; never a file in
git, never a URL):

- ``mlflow-users`` (``python -m tlops.tracking.auth_users setup``) runs as the admin the server
  bootstrapped from ``MLFLOW_AUTH_ADMIN_*``: creates (or re-passwords) the ``pipeline``,
  ``reviewer`` and ``reader`` users, has the *reviewer* create the config's registered model (the
  creator gets MANAGE, so the pipeline never owns a model it could promote) and grants the
  pipeline EDIT on it. The step services start after it and log in as ``pipeline``.
- ``promote`` (``python -m tlops.tracking.auth_users promote``) runs as the reviewer after
  ``register``: ``register.auto_promote`` is the config's request for a promotion, which the
  pipeline identity may not perform (the compose file runs ``register`` with
  ``register.auto_promote=false``), so the reviewer service carries it out for the version
  ``register`` recorded, through :func:`tlops.tracking.registry.promote` (which refuses a version
  whose gates failed).

It uses MLflow's own auth client (``get_app_client("basic-auth", ...)``), the same calls the
set-up snippet in docs/security.md shows; tests/test_auth.py runs it against a real server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

log = logging.getLogger(__name__)

#: role -> (username variable, default username, password variable)
ROLES = {
    "pipeline": ("TLOPS_MLFLOW_PIPELINE_USER", "pipeline", "TLOPS_MLFLOW_PIPELINE_PASSWORD"),
    "reviewer": ("TLOPS_MLFLOW_REVIEWER_USER", "reviewer", "TLOPS_MLFLOW_REVIEWER_PASSWORD"),
    "reader": ("TLOPS_MLFLOW_READER_USER", "reader", "TLOPS_MLFLOW_READER_PASSWORD"),
}
ADMIN = ("MLFLOW_AUTH_ADMIN_USERNAME", "admin", "MLFLOW_AUTH_ADMIN_PASSWORD")
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def credentials(role: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(username, password) of ``role`` (or ``"admin"``) from the environment; a missing password is an error."""
    user_var, default, password_var = ADMIN if role == "admin" else ROLES[role]
    password = env.get(password_var)
    if not password:
        raise SystemExit(f"error: {password_var} is not set (the {role} password; docker/.env or the environment)")
    return env.get(user_var) or default, password


@contextmanager
def identity(username: str, password: str) -> Iterator[None]:
    """Act as ``username``: MLflow's clients read the credentials from these two variables only."""
    old = {k: os.environ.get(k) for k in CREDENTIAL_VARS}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = username, password
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exists(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def ensure_user(admin, username: str, password: str) -> None:
    """Create ``username``, or set its password if it exists (the environment is the source of truth)."""
    from mlflow.exceptions import MlflowException

    try:
        admin.create_user(username, password)
    except MlflowException as err:
        if not _exists(err):
            raise
        admin.update_user_password(username, password)


def grant(admin, username: str, model: str, permission: str) -> None:
    """Give ``username`` exactly ``permission`` on registered model ``model`` (replacing an existing grant)."""
    from mlflow.exceptions import MlflowException

    try:
        admin.grant_user_permission(username, "registered_model", model, permission)
    except MlflowException as err:
        if not _exists(err):
            raise
        admin.revoke_user_permission(username, "registered_model", model)
        admin.grant_user_permission(username, "registered_model", model, permission)


def setup(uri: str, models: list[str], users: Mapping[str, tuple[str, str]], admin: tuple[str, str]) -> None:
    """Users for every role in ``users``; each model created by the reviewer, EDIT for the pipeline.

    Idempotent: a second start of the compose project finds everything in place.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with identity(*admin):
        client = get_app_client("basic-auth", tracking_uri=uri)
        for username, password in users.values():
            ensure_user(client, username, password)
    reviewer, pipeline = users["reviewer"][0], users["pipeline"][0]
    for model in models:
        with identity(*users["reviewer"]):
            try:  # the creator gets MANAGE on it: the reviewer owns the model, not the pipeline
                MlflowClient(uri).create_registered_model(model)
            except MlflowException as err:
                if not _exists(err):
                    raise
        with identity(*admin):
            # a model that existed before (created by someone else): make sure the reviewer may promote it
            grant(client, reviewer, model, "MANAGE")
            grant(client, pipeline, model, "EDIT")
        log.info("mlflow-users: %s: %s MANAGE, %s EDIT", model, reviewer, pipeline)


def promote_registered(registration: Path, *, auto_promote: bool) -> str:
    """Promote the version ``register`` recorded in ``registration`` (its registration.json) if asked."""
    from tlops.tracking import registry

    rec = json.loads(registration.read_text())
    name, version = rec["model_name"], str(rec["version"])
    if not auto_promote:
        return f"{name} v{version}: register.auto_promote is off; promote it with `tlops promote` as a reviewer"
    res = registry.promote(name, version, reason="auto_promote: gates passed (compose promote service, reviewer)")
    return f"{name}: champion -> v{res['champion']}" if res["changed"] else f"{name}: v{version} is already champion"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlops.tracking.auth_users", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup", help="create the users and grants (as the admin)")
    p_setup.add_argument("--config", required=True, help="pipeline YAML: its register.model_name gets the grants")
    p_promote = sub.add_parser("promote", help="carry out register.auto_promote (run it as the reviewer)")
    p_promote.add_argument("--config", required=True)
    p_promote.add_argument("--registration", required=True, help="the register step's output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tlops.config import load_config
    from tlops.errors import TlopsError

    cfg = load_config(args.config)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    try:
        if args.cmd == "setup":
            setup(uri, [cfg.register.model_name], {r: credentials(r) for r in ROLES}, credentials("admin"))
            print(f"mlflow-users: users {', '.join(credentials(r)[0] for r in ROLES)}; {cfg.register.model_name} ready")
        else:
            # as whoever MLFLOW_TRACKING_USERNAME names: the compose service passes the reviewer
            reg = Path(args.registration) / "registration.json"
            print("promote:", promote_registered(reg, auto_promote=cfg.register.auto_promote))
    except TlopsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
