"""Who may promote, against a real ``mlflow server --app-name tlops-auth`` on loopback.

Three identities (docs/security.md): ``pipeline`` (EDIT on the model: registers versions, sets
``challenger``), ``reviewer`` (MANAGE: moves ``champion``, rolls back) and ``reader`` (the
server's default READ). Every assertion about what happened reads the registry itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tlops.errors import TlopsError
from tlops.tracking import registry
from tlops.tracking.auth_app import protected_alias_denial

MODEL = "auth-model"
PASSWORDS = {"admin": "admin-Pw-0123456789", "pipeline": "pipe-Pw-0123456789", "reviewer": "rev-Pw-0123456789"}
PASSWORDS["reader"] = "read-Pw-0123456789"
START_TIMEOUT_S = 90
SERVER: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_bin() -> str:
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The auth server on 127.0.0.1:<free port> with sqlite stores in a temp dir; always stopped."""
    pytest.importorskip("flask_wtf", reason="the auth app needs Flask-WTF (pip install -e .[server])")
    tmp = tmp_path_factory.mktemp("auth-server")
    ini = tmp / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "TLOPS_AUTH_"))}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret-key",
    }
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [
            _mlflow_bin(),
            "server",
            "--app-name",
            "tlops-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--serve-artifacts",
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"auth server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        SERVER["url"] = url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()


@contextmanager
def _as(user: str):
    """Credentials from the environment only (never in the URI), as tlops' clients get them."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "TLOPS_USER")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["MLFLOW_TRACKING_URI"] = SERVER["url"]  # conftest points each test at its own store
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, PASSWORDS[user]
    os.environ["TLOPS_USER"] = "someone-else"  # must not be what the registry records
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def registry_setup(server):
    """Users and grants as docs/security.md sets them up; two versions registered by the pipeline."""
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    with _as("admin"):
        admin = get_app_client("basic-auth", tracking_uri=server)
        for user in ("pipeline", "reviewer", "reader"):
            admin.create_user(user, PASSWORDS[user])
    with _as("reviewer"):  # the reviewer creates (so owns: MANAGE) the model
        MlflowClient().create_registered_model(MODEL)
    with _as("admin"):
        admin.grant_user_permission("pipeline", "registered_model", MODEL, "EDIT")
    with _as("pipeline"):
        c = MlflowClient()
        exp = c.create_experiment("auth-test")
        versions = []
        for _ in range(2):
            run = c.create_run(exp)
            mv = c.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
            c.set_model_version_tag(MODEL, mv.version, registry.VALIDATION_TAG, "passed")
            versions.append(str(mv.version))
        c.set_registered_model_alias(MODEL, registry.CHALLENGER, versions[-1])
    return versions


def _aliases() -> dict[str, str]:
    from mlflow import MlflowClient

    with _as("reader"):
        return {a: str(v) for a, v in MlflowClient().get_registered_model(MODEL).aliases.items()}


def _tags(version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    with _as("reader"):
        return dict(MlflowClient().get_model_version(MODEL, version).tags)


def test_protected_alias_rule_unit():
    assert protected_alias_denial("challenger", is_admin=False, can_manage=False, name="m") is None
    assert protected_alias_denial("champion", is_admin=True, can_manage=False, name="m") is None
    assert protected_alias_denial("champion", is_admin=False, can_manage=True, name="m") is None
    msg = protected_alias_denial("previous-champion", is_admin=False, can_manage=False, name="m")
    assert msg and "MANAGE" in msg and "'previous-champion'" in msg


@pytest.mark.slow
def test_who_may_move_champion(registry_setup):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    v1, v2 = registry_setup
    assert _aliases() == {"challenger": v2}  # the pipeline set challenger itself

    # the pipeline identity cannot move champion: one line naming the missing permission, nothing changed
    with _as("pipeline"):
        with pytest.raises(TlopsError) as err:
            registry.promote(MODEL, v1, reason="pipeline tries")
        with pytest.raises(MlflowException) as raw:  # nor through the raw API, nor delete it
            MlflowClient().set_registered_model_alias(MODEL, "champion", v1)
        assert raw.value.get_http_status_code() == 403
    assert str(err.value) == (
        f"permission denied: user 'pipeline' may not move 'champion' of registered model '{MODEL}': "
        "needs MANAGE on the registered model (the reviewer role)"
    )
    assert _aliases() == {"challenger": v2}
    assert "tlops.promoted" not in _tags(v1)
    with _as("reader"):
        assert registry.HISTORY_TAG not in MlflowClient().get_registered_model(MODEL).tags

    # the reviewer can; the tag records the authenticated user, not TLOPS_USER
    with _as("reviewer"):
        registry.promote(MODEL, v1, reason="first release")
        registry.promote(MODEL, v2, reason="better")
    assert _aliases() == {"challenger": v2, "champion": v2, "previous-champion": v1}
    stamp = _tags(v2)["tlops.promoted"]
    assert stamp.startswith("reviewer ") and stamp.endswith(" better"), stamp

    # rollback: the pipeline is refused (nothing changed), the reviewer rolls back
    with _as("pipeline"):
        with pytest.raises(TlopsError, match=r"^permission denied: user 'pipeline' may not move 'champion'"):
            registry.rollback(MODEL, reason="pipeline tries")
        with pytest.raises(MlflowException) as raw:
            MlflowClient().delete_registered_model_alias(MODEL, "champion")
        assert raw.value.get_http_status_code() == 403
    assert _aliases() == {"challenger": v2, "champion": v2, "previous-champion": v1}
    with _as("reviewer"):
        registry.rollback(MODEL, reason="regression")
    assert _aliases() == {"challenger": v2, "champion": v1, "previous-champion": v2}
    assert _tags(v1)["tlops.rolled_back"].startswith("reviewer ")

    # the reader reads but changes nothing, not even challenger
    with _as("reader"):
        with pytest.raises(MlflowException) as raw:
            MlflowClient().set_registered_model_alias(MODEL, "challenger", v1)
        assert raw.value.get_http_status_code() == 403
    assert _aliases()["challenger"] == v2


@pytest.mark.slow
def test_no_credentials_no_access(server, registry_setup):
    req = urllib.request.Request(f"{server}/api/2.0/mlflow/registered-models/get?name={MODEL}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_compose_bootstrap_sets_up_users_and_grants_and_promotes_as_reviewer(
    server, registry_setup, tmp_path, monkeypatch
):
    """The compose runner's one-shot services (tlops.tracking.auth_users), against the real server: the
    `mlflow-users` set-up makes the reviewer own the model and gives the pipeline EDIT (idempotent);
    the pipeline can then register and set challenger but not champion; `promote` as the reviewer can."""
    import json

    import yaml
    from conftest import digits_config
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from tlops.tracking import auth_users

    model = "compose-model"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(tmp_path / "w", register={"model_name": model, "auto_promote": True})))
    env = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"]}
    for role in ("pipeline", "reviewer", "reader"):  # registry_setup made these users: set-up re-passwords them
        env[f"TLOPS_MLFLOW_{role.upper()}_PASSWORD"] = PASSWORDS[role]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for _ in range(2):  # a restarted compose project runs it again
        assert auth_users.main(["setup", "--config", str(cfg)]) == 0

    with _as("admin"):
        admin = get_app_client("basic-auth", tracking_uri=server)
        perms = {u: admin.get_user_permission(u, "registered_model", model).permission for u in PASSWORDS}
    assert perms["reviewer"] == "MANAGE" and perms["pipeline"] == "EDIT" and perms["reader"] == "READ", perms

    with _as("pipeline"):
        c = MlflowClient()
        run = c.create_run(c.create_experiment("compose-auth"))
        mv = c.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        c.set_model_version_tag(model, mv.version, registry.VALIDATION_TAG, "passed")
        c.set_registered_model_alias(model, registry.CHALLENGER, mv.version)
        with pytest.raises(MlflowException) as raw:
            c.set_registered_model_alias(model, registry.CHAMPION, mv.version)
        assert raw.value.get_http_status_code() == 403
    reg = tmp_path / "register"
    reg.mkdir()
    (reg / "registration.json").write_text(json.dumps({"model_name": model, "version": mv.version}))
    args = ["promote", "--config", str(cfg), "--registration", str(reg)]
    with _as("pipeline"):  # the promote service with the pipeline's credentials would be refused
        assert auth_users.main(args) == 1
    with _as("reviewer"):
        assert auth_users.main(args) == 0
    with _as("reader"):
        got = MlflowClient().get_registered_model(model)
    assert {a: str(v) for a, v in got.aliases.items()} == {"challenger": str(mv.version), "champion": str(mv.version)}
    with _as("reader"):
        stamp = MlflowClient().get_model_version(model, mv.version).tags["tlops.promoted"]
    assert stamp.startswith("reviewer "), stamp
