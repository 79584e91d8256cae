"""``tlops serve`` over real HTTP on loopback, against a real (sqlite) MLflow registry.

One tiny digits pipeline run registers the model; a second version of it is registered from
the same artifacts, so ``champion`` has somewhere to move. The server runs as ``tlops serve``
in a subprocess; clients are tritonclient (a third-party Open Inference Protocol client) and
httpx (MLflow's ``/invocations`` formats).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import digits_config
from tests.test_model_artifact import _digits, _png_b64

NAME = "t-digits"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    """A registry holding t-digits v1 (a real pipeline run) and v2 (the same artifacts), champion = v1."""
    from mlflow import MlflowClient

    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking import registry
    from tlops.tracking.setup import embedded_uri, use_store

    work = tmp_path_factory.mktemp("serve") / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        run_pipeline(validate_config(digits_config(work)))
    use_store(embedded_uri(work))
    c = MlflowClient()
    v1 = c.get_model_version(NAME, "1")
    c.create_model_version(NAME, v1.source, run_id=v1.run_id, tags=v1.tags)
    registry.promote(NAME, "1")
    return SimpleNamespace(work=work, uri=embedded_uri(work))


def start_server(work: Path, model: str, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``tlops serve`` on a free loopback port; returns the process and its URL once ready."""
    import httpx

    tlops = str(Path(sys.executable).with_name("tlops"))
    cmd = [tlops, "serve", model, "--workdir", str(work), "--port", "0", *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tlops serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if url is None:
            m = re.search(r"tlops serve: \S+ \(v\d+\) on (http://\S+)", log.read_text())
            url = m.group(1) if m else None
        if url:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"tlops serve not ready after 120 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(reg, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    proc, url = start_server(
        reg.work,
        f"{NAME}@champion",
        log,
        "--host",
        "127.0.0.1",
        "--poll-interval",
        "0.3",
        "--max-batch-size",
        "16",
        "--max-batch-wait-ms",
        "5",
        "--max-request-bytes",
        "200000",
        "--max-request-items",
        "64",
        "--monitor-window",
        "128",
        "--monitor-every",
        "0.5",
        "--monitor-min-inputs",
        "100",
    )
    yield SimpleNamespace(url=url, proc=proc, log=log)
    stop_server(proc)


def _pixels(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as the model was trained on them: uint8 0-255."""
    x, y = _digits(n)
    return np.round(x * 255 / 16).astype(np.uint8), y


def test_a_third_party_v2_client_speaks_to_it(server):
    import tritonclient.http as triton

    x, y = _pixels()
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and [o["name"] for o in meta["outputs"]] == ["label", "score", "probabilities"]

    arrays = triton.InferInput("image", list(x.shape), "UINT8")
    arrays.set_data_from_numpy(x)  # binary tensor extension
    res = client.infer(NAME, [arrays])
    body = res.get_response()
    assert body["model_name"] == NAME and body["model_version"] == "1"
    assert json.loads(body["parameters"]["classes"]) == ["0", "1", "2"]
    probs = res.as_numpy("probabilities")
    assert probs.shape == (len(x), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    labels = [v.decode() for v in res.as_numpy("label")]
    assert labels == [str(i) for i in probs.argmax(1)]
    np.testing.assert_allclose(res.as_numpy("score"), probs.max(1), rtol=1e-6)

    # the same images as base64 PNG in a BYTES tensor get the same answer (KServe's REST decoding turns
    # BYTES into UTF-8 strings, so encoded images travel as base64)
    pngs = np.array([_png_b64(im).encode() for im in x], dtype=object)
    encoded = triton.InferInput("image", [len(pngs)], "BYTES")
    encoded.set_data_from_numpy(pngs)
    res2 = client.infer(NAME, [encoded])
    np.testing.assert_allclose(res2.as_numpy("probabilities"), probs, atol=1e-5)

    # the range guard over V2: raw sklearn digits (0-16) are refused with the reason
    raw = triton.InferInput("image", list(x.shape), "FP32")
    raw.set_data_from_numpy(_digits(6)[0].astype(np.float32))
    with pytest.raises(triton.InferenceServerException) as e:
        client.infer(NAME, [raw])
    assert e.value.status() == "400" and "multiply by 255/16" in e.value.message()


def test_mlflow_formats_limits_and_metrics_over_http(server):
    import httpx

    x, _ = _pixels(4)
    b64 = [_png_b64(im) for im in x]
    inv = f"{server.url}/invocations"
    answers = []
    for payload in (
        {"dataframe_split": {"columns": ["image"], "data": [[s] for s in b64]}},
        {"dataframe_records": [{"image": s} for s in b64]},
        {"instances": [{"b64": s} for s in b64]},
        {"inputs": x.tolist()},
        {"dataframe_split": {"columns": [f"p{i}" for i in range(64)], "data": x.reshape(4, -1).tolist()}},
    ):
        r = httpx.post(inv, json=payload)
        assert r.status_code == 200, (payload.keys(), r.text)
        assert r.headers["x-tlops-model-version"] == "1"
        rows = r.json()["predictions"]
        assert [row["model_version"] for row in rows] == ["1"] * 4 and rows[0]["model_alias"] == "champion"
        answers.append([[row[f"prob_{c}"] for c in "012"] for row in rows])
    for a in answers[1:]:
        np.testing.assert_allclose(a, answers[0], atol=1e-5)
    csv = io.StringIO()
    np.savetxt(csv, x.reshape(4, -1), delimiter=",", fmt="%d", header=",".join(f"p{i}" for i in range(64)), comments="")
    r = httpx.post(inv, content=csv.getvalue(), headers={"content-type": "text/csv"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text

    # bad payloads: 400 with the reason
    raw = httpx.post(inv, json={"inputs": _digits(2)[0].tolist()})
    assert raw.status_code == 400 and "multiply by 255/16" in raw.json()["message"]
    assert "trained on 0-255" in raw.json()["message"]
    r = httpx.post(inv, json={"dataframe_split": {"columns": ["image"], "data": [["not base64!"]]}})
    assert r.status_code == 400 and "base64" in r.json()["message"]
    r = httpx.post(inv, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    v2 = httpx.post(
        f"{server.url}/v2/models/{NAME}/infer",
        json={"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32", "data": [-1.0] * 64}]},
    )
    assert v2.status_code == 400 and "already normalised" in v2.json()["error"]

    # limits: the body (before it is read) and the number of inputs
    big = httpx.post(inv, json={"inputs": np.zeros((2000, 8, 8), dtype=np.uint8).tolist()})
    assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]
    many = httpx.post(inv, json={"instances": [{"b64": b64[0]}] * 65})
    assert many.status_code == 413 and "65 inputs; the limit is 64" in many.json()["error"]

    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'tlops_requests_total\{code="200",endpoint="invocations",model="t-digits"\} [1-9]', text)
    assert re.search(r'tlops_requests_total\{code="400",endpoint="invocations",model="t-digits"\} [1-9]', text)
    assert re.search(r'tlops_requests_total\{code="413",endpoint="invocations",model="t-digits"\} 2', text)
    assert re.search(r'tlops_request_seconds_bucket\{endpoint="invocations",le="0.1",model="t-digits"\}', text)
    assert re.search(r'tlops_batch_inputs_count\{model="t-digits"\} [1-9]', text)
    assert re.search(r'tlops_model_version_info\{alias="champion",model="t-digits",version="\d+"\} 1.0', text)
    assert 'request_predict_seconds_count{model_name="t-digits"}' in text  # KServe's own series


def test_champion_moves_twice_under_load_without_a_failed_request(reg, server):
    """8 closed-loop clients for at most 8 s while champion goes v1 -> v2 -> v1 (promote, rollback)."""
    import httpx

    from tlops.tracking import registry
    from tlops.tracking.setup import use_store

    use_store(reg.uri)
    x, _ = _pixels(2)
    v2_body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    inv_body = {"inputs": x.tolist()}
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(8)]
    failures: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    if k % 2:
                        r = c.post(f"/v2/models/{NAME}/infer", json=v2_body)
                        versions = {r.json()["model_version"]} if r.status_code == 200 else set()
                    else:
                        r = c.post("/invocations", json=inv_body)
                        versions = (
                            {p["model_version"] for p in r.json()["predictions"]} if r.status_code == 200 else set()
                        )
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append(f"client {k}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200 or len(versions) != 1 or r.headers["x-tlops-model-version"] not in versions:
                    failures.append(f"client {k}: {r.status_code} {r.text[:200]}")
                    continue
                seen[k].append(versions.pop())

    def wait_for(version: str, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if all(s and s[-1] == version for s in seen):
                return True
            time.sleep(0.05)
        return False

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        assert wait_for("1", 3), "clients did not start"
        registry.promote(NAME, "2")
        moved = wait_for("2", 3.5)
        registry.rollback(NAME)
        back = wait_for("1", 8 - (time.monotonic() - start))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert moved and back, [s[-3:] for s in seen]
    total = sum(len(s) for s in seen)
    assert total > 50 and all(set(s) == {"1", "2"} for s in seen)
    for s in seen:  # each client saw v1, then v2, then v1 again: two swaps, nothing interleaved
        changes = [i for i in range(1, len(s)) if s[i] != s[i - 1]]
        assert len(changes) == 2, s
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'tlops_model_swaps_total\{model="t-digits"\} 2', metrics)
    assert re.search(r'tlops_batch_requests_bucket\{le="1.0",model="t-digits"\}', metrics)


def test_monitor_window_flags_rotated_digits_among_served_inputs(server):
    """The last 128 served inputs are rotated digits: the rolling-window monitor (the statistics of
    `tlops monitor`) flags them, on /monitor and /metrics."""
    import httpx
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, [0, 1, 2])
    rotated = np.rot90(np.round(d.images[keep] * 255 / 16).astype(np.uint8), axes=(1, 2))[:128]
    seen_before = httpx.get(f"{server.url}/monitor").json().get("inputs_seen", 0)
    for part in (rotated[:64], rotated[64:]):
        r = httpx.post(f"{server.url}/invocations", json={"inputs": part.tolist()})
        assert r.status_code == 200, r.text
    deadline, res = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        res = httpx.get(f"{server.url}/monitor").json()
        if res.get("inputs_seen", 0) >= seen_before + 128:
            break
        time.sleep(0.3)
    assert res.get("inputs_seen", 0) >= seen_before + 128, res
    assert res["n"] == 128 and res["window"] == 128 and res["model_name"] == NAME
    assert res["verdict"] in ("shift", "severe") and res["flagged_by"], res
    assert 0.0 <= res["accuracy"]["estimate"] <= 1.0
    text = httpx.get(f"{server.url}/metrics").text
    v = res["model_version"]
    assert f'tlops_monitor_verdict{{model="t-digits",verdict="{res["verdict"]}",version="{v}"}} 1.0' in text
    assert f'tlops_monitor_inputs{{model="t-digits",version="{v}"}} 128.0' in text
    assert re.search(r'tlops_monitor_p_value\{model="t-digits",test="c2st",version="\d+"\} ', text)
