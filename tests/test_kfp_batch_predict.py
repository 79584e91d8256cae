"""The ``batch-predict`` KFP pipeline: compiled IR (one hardened task, no runtime pip install, never
cached), the committed YAML is fresh, a recurring run through ``tlops schedule``, and a real
``kfp.local`` run against the registered digits model (``reg`` of test_model_artifact)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, digits_config, run_cli
from tests.fake_kfp_server import FakeKfpServer
from tests.test_kfp_submit import sent_pipeline_spec
from tests.test_model_artifact import reg  # noqa: F401 - the fixture: a registered t-digits model
from tlops.config import load_config, validate_config

CRON = "0 0 2 * * *"


def _ir(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], docs[1]


def test_compiled_batch_predict_is_one_hardened_uncached_task(tmp_path, monkeypatch):
    from tlops.kfp.batch_predict import compile_batch_predict
    from tlops.kfp.pipeline import POD_LABELS, RUN_AS

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    secrets = [{"name": "tlops-mlflow", "env": {"MLFLOW_TRACKING_PASSWORD": "password"}}]
    cfg = validate_config(digits_config(tmp_path / "w", kubernetes={"secrets": secrets}))
    spec, platform = _ir(compile_batch_predict(cfg, tmp_path / "bp.yaml"))
    assert spec["pipelineInfo"]["name"] == "tlops-t-digits-batch-predict"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config", "model", "data_uri", "out_uri", "out_format", "data_format", "shard_size"}
    assert not params["data_uri"].get("isOptional")  # no default: each run names its data
    assert params["model"]["defaultValue"] == "t-digits@champion"
    ((name, task),) = spec["root"]["dag"]["tasks"].items()
    assert name == "batch-predict" and task["cachingOptions"].get("enableCache", False) is False
    assert task["retryPolicy"]["maxRetryCount"] == 3  # talks to MLflow / S3: retried like pull-model
    container = spec["deploymentSpec"]["executors"]["exec-batch-predict"]["container"]
    assert container["image"] == "tlops:0.1.0"
    assert "pip install" not in " ".join(container["command"])  # kfp and tlops come with the image
    assert "run_batch_predict" in container["command"][-1]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-batch-predict"]
    sc = k8s["securityContext"]  # Pod Security "restricted": the image's non-root user
    assert sc["runAsNonRoot"] is True and int(sc["runAsUser"]) == int(sc["runAsGroup"]) == RUN_AS
    assert k8s["podMetadata"]["labels"] == POD_LABELS
    assert {e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]} == {"MLFLOW_TRACKING_PASSWORD"}
    # the same settings as the transfer pipeline's tasks
    from tlops.kfp.pipeline import compile_pipeline

    _, tl_platform = _ir(compile_pipeline(cfg, tmp_path / "tl.yaml"))
    ingest = tl_platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ingest"]
    assert k8s["securityContext"] == ingest["securityContext"] and k8s["podMetadata"] == ingest["podMetadata"]


def test_committed_batch_predict_pipeline_is_fresh(tmp_path, monkeypatch):
    from tlops.kfp.batch_predict import compile_batch_predict

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    committed = REPO / "pipelines" / "batch_predict" / "digits-target.yaml"
    cfg = load_config(REPO / "configs" / "digits_target.yaml")
    fresh = compile_batch_predict(cfg, tmp_path / "fresh.yaml").read_text()
    assert committed.read_text() == fresh, "run: make compile (pipelines/batch_predict/digits-target.yaml is stale)"


def test_compile_cli_and_unknown_pipeline(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(digits_config(tmp_path / "w")))
    out = tmp_path / "bp.yaml"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "compile", "--config", str(config), "--pipeline", "batch-predict", "--out", str(out)
    )
    assert code == 0, err
    assert "batch-predict, default model t-digits@champion" in stdout
    assert _ir(out)[0]["pipelineInfo"]["name"] == "tlops-t-digits-batch-predict"
    code, _, err = run_cli(monkeypatch, capsys, "compile", "-c", str(config), "--pipeline", "nope", "-o", str(out))
    assert code == 2 and "allowed: transfer-learning, batch-predict, monitor-and-adapt" in err


def test_schedule_batch_predict_creates_a_recurring_run(tmp_path, monkeypatch, capsys):
    import kfp

    from tlops.kfp import client as kfp_client

    for k in list(os.environ):
        if k.startswith(("KFP_TOKEN", "KF_PIPELINES_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "home" / "context.json"))
    monkeypatch.setattr(kfp_client, "DEFAULT_TOKEN_FILE", tmp_path / "no-such-token")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(digits_config(tmp_path / "w")))
    with FakeKfpServer() as server:
        args = ["schedule", "--host", server.url, "-c", str(config), "--pipeline", "batch-predict", "--cron", CRON]
        params = ["--param", "data_uri=s3://bucket/new/", "--param", "out_uri=s3://bucket/pred.parquet"]
        code, stdout, err = run_cli(monkeypatch, capsys, *args, *params)
        assert code == 0, err
        (req,) = server.requests_to("POST", "/apis/v2beta1/recurringruns")
    body = req["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == CRON and body["display_name"] == "t-digits batch-predict"
    assert sent_pipeline_spec(body["pipeline_spec"])["pipelineInfo"]["name"] == "tlops-t-digits-batch-predict"
    assert body["runtime_config"]["parameters"] == {
        "data_uri": "s3://bucket/new/",
        "out_uri": "s3://bucket/pred.parquet",
    }
    assert stdout.startswith("scheduled t-digits batch-predict (")


def test_kfp_local_batch_predict_matches_tlops_predict(reg, tmp_path):  # noqa: F811 - the imported fixture
    """The compiled task (a kfp.local subprocess) writes what ``tlops predict`` writes, to the
    artifact and to a local out_uri (where its resumable parts live)."""
    from tlops.kfp.batch_predict import run_kfp_local
    from tlops.serving.predict import predict
    from tlops.tracking.setup import use_store

    cfg = validate_config(digits_config(tmp_path / "w", tracking={"uri": reg.uri}))
    out_uri = tmp_path / "shared" / "pred.parquet"
    got = run_kfp_local(
        cfg, model="t-digits@challenger", data_uri="sklearn:digits", out_uri=str(out_uri), shard_size=500
    )
    assert got.name == "predictions.parquet" and got.is_relative_to(tmp_path / "w" / "kfp-local")
    kfp_df = pd.read_parquet(got)
    pd.testing.assert_frame_equal(kfp_df, pd.read_parquet(out_uri))
    assert not (tmp_path / "shared" / "pred.parquet.parts").exists()  # finished: parts cleaned up
    use_store(reg.uri)
    cli_df = pd.read_parquet(
        predict("t-digits@challenger", "sklearn:digits", tmp_path / "cli.parquet", shard_size=500)["out"]
    )
    assert len(kfp_df) == 1797 and set(kfp_df["model_version"]) == {"1"}
    pd.testing.assert_frame_equal(kfp_df, cli_df)


def test_empty_data_uri_is_a_clear_error(tmp_path):
    from types import SimpleNamespace

    from tlops.errors import ConfigError
    from tlops.kfp.batch_predict import run_batch_predict

    art = SimpleNamespace(path=str(tmp_path / "a"), metadata={})
    args = {"config": "{}", "model": "m@champion", "data_uri": "", "out_uri": "", "out_format": "parquet"}
    with pytest.raises(ConfigError, match="data_uri is empty"):
        run_batch_predict({**args, "data_format": "auto", "shard_size": 10, "image": "", "predictions": art})


def test_task_reads_s3_data_and_uploads_the_result(reg, s3, tmp_path):  # noqa: F811 - the imported fixture
    """The task body (what the component runs) with S3 on both ends: data from s3://, jsonl to s3://."""
    import json
    from types import SimpleNamespace

    import numpy as np
    from s3srv import BUCKET
    from sklearn.datasets import load_digits

    from tlops.kfp.batch_predict import run_batch_predict
    from tlops.storage import storage_for

    d = load_digits()
    local = tmp_path / "digits.npz"
    np.savez(local, x=(d.images[:300] / 16 * 255).round().astype(np.uint8), y=d.target[:300])
    storage_for(f"s3://{BUCKET}/in/digits.npz").upload_file(local, f"s3://{BUCKET}/in/digits.npz")
    config = json.dumps(validate_config(digits_config(tmp_path / "w", tracking={"uri": reg.uri})).to_dict())
    art = SimpleNamespace(path=str(tmp_path / "artifact"), metadata={})
    args = {"config": config, "model": "t-digits@challenger", "data_uri": f"s3://{BUCKET}/in/digits.npz"}
    args |= {"out_uri": f"s3://{BUCKET}/out/pred.jsonl", "out_format": "jsonl", "data_format": "auto"}
    res = run_batch_predict({**args, "shard_size": 128, "image": "tlops:0.1.0", "predictions": art})
    assert (res["rows"], res["shards"], res["model_version"]) == (300, 3, "1")
    assert art.metadata["file"] == "predictions.jsonl" and art.metadata["model_name"] == "t-digits"
    back = tmp_path / "back.jsonl"
    storage_for(args["out_uri"]).download_file(args["out_uri"], back)
    assert back.read_bytes() == (tmp_path / "artifact" / "predictions.jsonl").read_bytes()
    rows = [json.loads(line) for line in back.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(300))
