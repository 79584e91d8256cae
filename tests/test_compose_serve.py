"""The compose file's ``serve`` service (offline): ``tlops serve`` after ``register``, hardened like
the steps, reachable on the host's loopback only, ready when /v2/health/ready answers; the compose
CLI accepts the file (when docker compose is installed); compose-e2e queries the endpoint."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tlops.runners import compose


@pytest.mark.parametrize("host_network", [False, True])
def test_serve_service_follows_register_on_loopback(host_network):
    svc = compose.services(host_network=host_network)["serve"]
    assert svc["command"][:2] == ["serve", "${TLOPS_SERVE_MODEL:-digits-target@champion}"]
    assert svc["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "promote": {"condition": "service_completed_successfully"},  # after register, and champion moved
    }
    assert svc["cap_drop"] == ["ALL"] and svc["read_only"] is True and svc["tmpfs"] == ["/tmp"]
    assert svc["security_opt"] == ["no-new-privileges:true"] and svc["environment"]["HOME"] == "/tmp"
    host = svc["command"][svc["command"].index("--host") + 1]
    port = svc["command"][svc["command"].index("--port") + 1]
    assert svc["healthcheck"]["test"][-1].endswith(f"('http://127.0.0.1:{port}/v2/health/ready', timeout=3)")
    if host_network:  # shares the host's interfaces: binds loopback itself, publishes nothing
        assert host == "127.0.0.1" and "ports" not in svc and svc["network_mode"] == "host"
    else:  # its own network namespace: published on the host's loopback only
        assert host == "0.0.0.0" and svc["ports"] == ["127.0.0.1:${TLOPS_SERVE_PORT:-8080}:8080"]
    assert (
        yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["serve"]
        == (compose.services()["serve"])
    )


def test_docker_compose_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "TLOPS_ARTIFACTS": str(tmp_path / "a")}
    env |= {"TLOPS_CONFIG": "/dev/null", "TLOPS_RUN_ID": "x", "TLOPS_SERVE_MODEL": "digits-source@champion"}
    env |= {"TLOPS_SERVE_PORT": "18080"}
    env |= {f"TLOPS_MLFLOW_{r}_PASSWORD": "x" for r in ("ADMIN", "PIPELINE", "REVIEWER", "READER")}
    env |= {"TLOPS_MLFLOW_SECRET_KEY": "x"}
    proc = subprocess.run(
        [docker, "compose", "-f", str(REPO / "docker" / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    serve = json.loads(proc.stdout)["services"]["serve"]
    assert serve["command"][:2] == ["serve", "digits-source@champion"]
    (published,) = serve["ports"]
    assert (published["host_ip"], published["published"], published["target"]) == ("127.0.0.1", "18080", 8080)


def test_compose_e2e_queries_the_serve_endpoint():
    script = (REPO / "docker" / "compose-e2e.sh").read_text()
    assert re.search(r"dc up -d --no-deps --pull never --wait serve", script)
    assert "/v2/health/ready" in script and "/v2/models/{name}/infer" in script
    assert subprocess.run(["bash", "-n", str(REPO / "docker" / "compose-e2e.sh")]).returncode == 0
