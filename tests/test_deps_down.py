"""Dependencies down: the MLflow tracking server unreachable or answering 5xx, and an S3
endpoint URL that carries credentials. Bounded retries with backoff, then a TlopsError that
names the endpoint, with no secret in it.

(S3 endpoint down mid-upload, transient 5xx/throttling retries and refused credentials are
covered in tests/test_s3_storage.py: test_endpoint_dies_during_cache_upload and
test_transient_errors_are_retried_then_reported.)
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

from tlops.errors import StorageError, TlopsError

TLOPS = str(Path(sys.executable).parent / "tlops")
USER, PASSWORD, TOKEN = "alice", "pw-Sup3rSecret", "tok-Sup3rSecret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_secret(*texts: str) -> None:
    for t in texts:
        assert PASSWORD not in t and TOKEN not in t and f"{USER}:" not in t, t


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class _Always503(http.server.BaseHTTPRequestHandler):
    hits: list[float] = []

    def _reply(self) -> None:
        type(self).hits.append(time.monotonic())
        body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down for maintenance"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *a) -> None:  # quiet
        pass


@pytest.fixture
def server_503():
    _Always503.hits = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], _Always503.hits
    srv.shutdown()
    srv.server_close()


def test_bounded_defaults_are_set_only_for_http_and_only_when_unset(monkeypatch):
    from tlops.tracking.setup import HTTP_DEFAULTS, bound_http_retries

    for k in HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    bound_http_retries("sqlite:///x.db")
    assert not any(k in os.environ for k in HTTP_DEFAULTS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    bound_http_retries("https://mlflow.example.com")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # the user's value wins
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert (
        int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3
        and int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    )


def test_tracking_server_answering_503_is_retried_with_backoff_then_reported(
    server_503, secrets, digits_cfg, monkeypatch, caplog
):
    from tlops.tracking.setup import TrackingError, configure

    port, hits = server_503
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{USER}:{PASSWORD}@127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        configure(digits_cfg())
    took = time.monotonic() - t0
    msg = str(e.value)
    assert msg.startswith(
        f"MLflow tracking server http://127.0.0.1:{port} returned HTTP 503 after 3 attempts while looking up experiment"
    ), msg
    assert len(hits) == 3  # 1 try + MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, then it gives up
    gaps = [b - a for a, b in zip(hits, hits[1:], strict=False)]
    assert gaps[-1] >= 1.5, gaps  # exponential backoff (factor 1: waits of 0 s, then 2 s)
    assert took < 30
    assert "MLFLOW_TRACKING_URI" in msg and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in msg
    assert_no_secret(msg, caplog.text)
    print(f"\n503 server: {len(hits)} requests, gaps {[round(g, 2) for g in gaps]} s, error after {took:.1f}s")


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free loopback port."""
    port = free_port()
    d = tmp_path / "mlflow-server"
    d.mkdir()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination",
        str(d / "artifacts"),
        "--workers",
        "1",
    ]
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its workers (its own session, started here)
            proc.wait(timeout=60)

    yield url, port, stop
    stop()
    log.close()


@pytest.mark.slow
def test_tracking_server_goes_down(mlflow_server, secrets, tmp_path, monkeypatch, caplog):
    """A pipeline against a real MLflow server works; the server dies mid-run -> TrackingError
    naming the endpoint; a new run against the dead server fails fast from the CLI, no traceback."""
    import mlflow

    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.steps import evaluate as evaluate_step
    from tlops.tracking.setup import TrackingError

    url, port, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    raw = digits_config(tmp_path / "work")
    cfg = validate_config(raw)
    res = run_pipeline(cfg)
    assert mlflow.MlflowClient(url).get_run(res.mlflow_run_id).info.status == "FINISHED"

    # the server dies in the middle of the next run (before evaluate)
    real = evaluate_step.run

    def dies_first(*a, **k):
        stop()
        return real(*a, **k)

    monkeypatch.setattr(evaluate_step, "run", dies_first)
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        run_pipeline(cfg, reuse=False)
    mid = str(e.value)
    assert mid.startswith(f"MLflow tracking server {url} unreachable after 3 attempts"), mid
    assert time.monotonic() - t0 < 120

    # a new run from the CLI, with credentials in the URI: exit 1, one clear line, no secret
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://{USER}:{PASSWORD}@127.0.0.1:{port}")
    t0 = time.monotonic()
    # --offline: past the pre-flight (which refuses a server that does not answer: test_preflight), into the run
    cmd = [TLOPS, "run", "--config", str(cfg_file), "--offline"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"error: MLflow tracking server http://127.0.0.1:{port} unreachable after 3 attempts" in r.stderr
    assert "Traceback" not in r.stderr
    assert_no_secret(mid, r.stdout, r.stderr, caplog.text)
    print(f"\nserver down: CLI failed in {took:.1f}s with: {r.stderr.strip().splitlines()[-1][:200]}")


def test_s3_endpoint_with_credentials_in_url_is_redacted(monkeypatch, tmp_path):
    """An unreachable S3 endpoint given as http://user:secret@host: the StorageError names the
    endpoint and the URI, without the user:secret part (retries: see test_s3_storage.py)."""
    from tlops.storage import S3Storage

    port = free_port()  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://{USER}:{PASSWORD}@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TOKEN)
    for k, v in {
        "TLOPS_S3_ATTEMPTS": "2",
        "TLOPS_S3_BACKOFF": "0.01",
        "TLOPS_S3_CLIENT_RETRIES": "0",
        "TLOPS_S3_CONNECT_TIMEOUT": "1",
    }.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(StorageError) as e:
        S3Storage().upload_file(tmp_path / "f.bin", "s3://bucket/k/f.bin")
    msg = str(e.value)
    assert msg.startswith("cannot upload f.bin to s3://bucket/k/f.bin: endpoint http://127.0.0.1:"), msg
    assert "unreachable after 2 attempts" in msg
    assert isinstance(e.value, TlopsError)
    assert_no_secret(msg)
