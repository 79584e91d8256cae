"""MLflow server app ``tlops-auth``: MLflow's basic-auth app plus one rule for the serving aliases.

``mlflow server --app-name tlops-auth`` (entry point ``mlflow.app``) runs MLflow's own
basic-auth app (users, passwords, per-experiment and per-registered-model permissions) and adds
one check on top. Why: MLflow authorizes ``SetRegisteredModelAlias`` / ``DeleteRegisteredModelAlias``
with the same permission (EDIT on the registered model) whatever the alias is, so an identity that
may register versions and set ``challenger`` could also move ``champion``. Here the aliases that
decide what serves (``champion``, ``previous-champion``) additionally need MANAGE on the
registered model (or an admin account); every other alias keeps MLflow's rule.

Roles (docs/security.md):

- reader: any authenticated user (``default_permission = READ``);
- pipeline: EDIT on the registered model: create versions, tag them, set ``challenger``;
- reviewer: MANAGE on the registered model: everything the pipeline may, plus move ``champion``
  (``tlops promote``, ``tlops rollback``).

The auth store location is the MLflow basic-auth configuration (``MLFLOW_AUTH_CONFIG_PATH``, an
ini file without credentials); when it is not set and ``TLOPS_AUTH_DATABASE_URI`` is, the ini is
written at start-up into a private temp file from that variable, so the database password comes
from a Secret through the environment and never sits in a file in git or an image.
"""

from __future__ import annotations

import os
import tempfile

PROTECTED_ALIASES = frozenset({"champion", "previous-champion"})
ALIAS_ROUTE_SUFFIX = "/mlflow/registered-models/alias"


def _auth_config_from_env() -> None:
    """Point MLflow's basic-auth at an ini built from ``TLOPS_AUTH_DATABASE_URI`` (if given)."""
    if os.environ.get("MLFLOW_AUTH_CONFIG_PATH") or not os.environ.get("TLOPS_AUTH_DATABASE_URI"):
        return
    text = (
        "[mlflow]\n"
        f"default_permission = {os.environ.get('TLOPS_AUTH_DEFAULT_PERMISSION', 'READ')}\n"
        f"database_uri = {os.environ['TLOPS_AUTH_DATABASE_URI'].replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd, path = tempfile.mkstemp(prefix="tlops-auth-", suffix=".ini")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = path  # inherited by the server's workers


def protected_alias_denial(alias: str | None, *, is_admin: bool, can_manage: bool, name: str | None) -> str | None:
    """The 403 message for moving ``alias`` of model ``name``, or None when it is allowed."""
    if alias not in PROTECTED_ALIASES or is_admin or can_manage:
        return None
    return (
        f"Permission denied: moving alias '{alias}' of registered model '{name}' needs MANAGE on it "
        "(the reviewer role); EDIT lets you register versions and set other aliases only"
    )


def _protect_serving_aliases():
    """Flask before_request hook, run after basic-auth's own (which authenticated the caller and
    checked EDIT): for a protected alias also require MANAGE on the model."""
    from flask import jsonify, request
    from mlflow.server import auth

    if request.method not in ("POST", "DELETE") or not request.path.endswith(ALIAS_ROUTE_SUFFIX):
        return None
    params = auth._request_params()
    alias, name = params.get("alias"), params.get("name")
    if alias not in PROTECTED_ALIASES:
        return None
    authorization = auth.authenticate_request()
    username = getattr(authorization, "username", None)
    if username is None:  # not authenticated: basic-auth has already answered 401; never allow
        return jsonify(error_code="UNAUTHENTICATED", message="authentication required"), 401
    is_admin = auth.store.get_user(username).is_admin
    can_manage = False if is_admin else auth._get_permission_from_registered_model_or_prompt_name().can_manage
    message = protected_alias_denial(alias, is_admin=is_admin, can_manage=can_manage, name=name)
    if message is None:
        return None
    return jsonify(error_code="PERMISSION_DENIED", message=message), 403


def create_app(app=None):
    """The ``tlops-auth`` app: MLflow basic-auth with the serving-alias rule (entry point target)."""
    _auth_config_from_env()
    from mlflow.server import app as flask_app
    from mlflow.server import auth

    flask = app or flask_app
    wrapped = auth.create_app(flask)
    flask.before_request(_protect_serving_aliases)  # registered after basic-auth's hook: runs after it
    return wrapped
