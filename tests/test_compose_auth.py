"""The compose runner's MLflow server with authentication (offline: the generated file itself).

The server runs ``--app-name tlops-auth``; every credential in the file is a ``${...}`` reference
to the environment (a gitignored .env), none is a literal and none is in a URL; the steps log in
as ``pipeline``, ``promote`` as ``reviewer``, ``summary`` and ``serve`` as ``reader``; the users
exist before any step starts. The same set-up code runs against a real server in
tests/test_auth.py::test_compose_bootstrap_sets_up_users_and_grants_and_promotes_as_reviewer.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO
from tlops.dag import STEP_NAMES
from tlops.runners import compose

SECRET_REF = re.compile(r"^\$\{(TLOPS_MLFLOW_[A-Z]+_PASSWORD|TLOPS_MLFLOW_SECRET_KEY):\?[^}]*\}$")
USER_REF = re.compile(r"^\$\{TLOPS_MLFLOW_[A-Z]+_USER:-[a-z]+\}$")


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("host_network", [False, True])
def test_compose_mlflow_runs_the_auth_app_with_credentials_from_env_only(host_network):
    services = compose.services(host_network=host_network)
    mlflow = services["mlflow"]
    assert "exec mlflow server --app-name tlops-auth " in mlflow["command"][0]
    env = mlflow["environment"]
    assert env["TLOPS_AUTH_DATABASE_URI"] == "sqlite:////artifacts/mlflow/auth.db"  # no password in it
    assert SECRET_REF.match(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) and SECRET_REF.match(
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    )

    for name, svc in services.items():
        env = svc["environment"]
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET", key):
                assert SECRET_REF.match(value), (name, key, value)  # a reference, never a value
            if key.endswith(("_USERNAME", "_USER")):
                assert USER_REF.match(value), (name, key, value)
        assert not any(re.search(r"://[^/@\s]+:[^/@\s]+@", s) for s in _strings(svc)), f"{name}: credentials in a URL"

    def login(name):
        env = services[name]["environment"]
        return env.get("MLFLOW_TRACKING_USERNAME", "").split(":-")[-1].rstrip("}")

    assert {s: login(s) for s in STEP_NAMES} == {s: "pipeline" for s in STEP_NAMES}
    assert (login("promote"), login("summary"), login("serve")) == ("reviewer", "reader", "reader")
    assert "MLFLOW_TRACKING_USERNAME" not in services["mlflow-users"]["environment"]  # switches identity itself
    assert "MLFLOW_TRACKING_USERNAME" not in services["mlflow"]["environment"]


def test_users_exist_before_any_step_and_promotion_is_the_reviewers():
    services = compose.services()
    done = {"condition": "service_completed_successfully"}
    users = services["mlflow-users"]
    assert users["entrypoint"] == ["python", "-m", "tlops.tracking.auth_users"]
    assert users["command"] == ["setup", "--config", compose.CONFIG]
    assert users["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    for step in STEP_NAMES:
        assert services[step]["depends_on"]["mlflow-users"] == done, step
    # register runs as the pipeline, so it must not try to move champion itself; promote does it
    register = services["register"]["command"]
    assert register[register.index("register.auto_promote=false") - 1] == "--set"
    promote = services["promote"]
    assert promote["command"] == [
        "promote",
        "--config",
        compose.CONFIG,
        "--registration",
        f"{compose.RUNS}/register",
    ]
    assert promote["depends_on"] == {"register": done}
    assert services["summary"]["depends_on"] == {"promote": done}
    assert all(s["read_only"] and s["cap_drop"] == ["ALL"] for s in (users, promote))


def test_auth_users_module_runs_as_the_compose_services_call_it(tmp_path):
    """The entry point the services use exists, and a missing password is one line, not a traceback."""
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "tlops.tracking.auth_users", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "setup" in proc.stdout and "promote" in proc.stdout, proc.stderr
    from tlops.tracking import auth_users

    with pytest.raises(SystemExit, match=r"^error: TLOPS_MLFLOW_PIPELINE_PASSWORD is not set"):
        auth_users.credentials("pipeline", env={})
    assert auth_users.credentials("reviewer", env={"TLOPS_MLFLOW_REVIEWER_PASSWORD": "x"}) == ("reviewer", "x")
