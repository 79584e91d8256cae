"""Multi-node fine-tuning on a cluster (``tlops.kfp.trainjob``), without a cluster.

* The TrainJob and PyTorchJob manifests validate against the CRD schemas vendored in
  ``k8s/schemas/`` (strictly: a field the CRD does not declare is an error) and carry the fine-tune
  task's GPU node-pool settings, torchrun's shape and the artifact URIs.
* submit / wait / cancel run against a real HTTP server on loopback (``fake_k8s_api``) through the
  real ``kubernetes`` client: success, failure with the job's reason, SIGTERM deleting the job.
* The fine-tune task's multi-node body fetches the artifact the job published to S3 (moto).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (TESTS, REPO / "k8s" / "schemas"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import crd_schemas  # noqa: E402
from fake_k8s_api import FakeApi  # noqa: E402

from tlops.kfp import trainjob  # noqa: E402

GPU = {
    "gpu": {
        "node_selector": {"pool": "a100"},
        "accelerator_limit": 2,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "secrets": [{"name": "tlops-s3", "env": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"}}],
}
INPUTS = {"dataset": "s3://b/ingest", "model": "s3://b/pull", "features": "s3://b/feat"}


def _cfg(digits_cfg, engine: str, gpu: bool = True):
    return digits_cfg(
        train={"strategies": ["fine-tune"], "distributed": {"nodes": 3, "engine": engine}},
        kubernetes=GPU if gpu else {},
    )


def _validate(tmp_path: Path, doc: dict) -> None:
    rendered, rest = tmp_path / "job.yaml", tmp_path / "rest.yaml"
    rendered.write_text(yaml.safe_dump(doc))
    assert crd_schemas.validate(rendered, rest) == 1, "checked against a vendored CRD schema"


@pytest.mark.parametrize("engine", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("gpu", [True, False])
def test_manifests_validate_against_the_vendored_crds(digits_cfg, tmp_path, engine, gpu):
    cfg = _cfg(digits_cfg, engine, gpu)
    job = trainjob.manifest(
        cfg, "reg/tlops@sha256:" + "a" * 64, INPUTS, "s3://b/out", name="tlops-ft-x", namespace="ns"
    )
    _validate(tmp_path, job)
    assert (job["apiVersion"], job["kind"]) == {
        "trainjob": ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
        "pytorchjob": ("kubeflow.org/v1", "PyTorchJob"),
    }[engine]
    if engine == "trainjob":
        t = job["spec"]["trainer"]
        assert (t["numNodes"], t["numProcPerNode"]) == (3, 2 if gpu else 1)
        command, res, env = t["command"], t["resourcesPerNode"], t["env"]
        (patch,) = job["spec"]["runtimePatches"]
        (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert node["name"] == "node"
        pod = node["template"]["spec"]["template"]["spec"]
    else:
        reps = job["spec"]["pytorchReplicaSpecs"]
        assert (reps["Master"]["replicas"], reps["Worker"]["replicas"]) == (1, 2)
        assert job["spec"]["nprocPerNode"] == str(2 if gpu else 1) and job["spec"]["runPolicy"]["backoffLimit"] == 0
        pod = reps["Worker"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"].endswith("a" * 64)
        command, res, env = c["command"], c["resources"], c["env"]
    assert command[:3] == ["torchrun", "--nnodes=3", f"--nproc-per-node={2 if gpu else 1}"]
    assert command[command.index("-m") + 1] == "tlops.runners.torchrun"
    assert command[command.index("--out") + 1] == "s3://b/out"
    assert [command[i + 1] for i, a in enumerate(command) if a == "--in"] == [f"{k}={v}" for k, v in INPUTS.items()]
    assert pod["securityContext"]["runAsNonRoot"] is True
    if gpu:  # the node pool the single-pod fine-tune task gets (tlops.kfp.pipeline.task_configurer)
        assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert res["limits"]["nvidia.com/gpu"] == "2" and res["requests"]["memory"] == "16Gi"
        assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
        assert {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "tlops-s3", "key": "AWS_ACCESS_KEY_ID"}},
        } in env
    else:
        assert "nodeSelector" not in pod and "nvidia.com/gpu" not in res["limits"]


def test_the_config_in_the_command_is_the_config(digits_cfg):
    from tlops.config import validate_config

    cfg = _cfg(digits_cfg, "trainjob")
    cmd = trainjob.worker_command(cfg, INPUTS, "s3://b/out")
    import json

    again = validate_config(json.loads(cmd[cmd.index("--config-json") + 1]))
    assert again.config_hash == cfg.config_hash and again.train.nodes == 3


def test_schema_refuses_what_the_crd_does_not_declare(digits_cfg, tmp_path):
    job = trainjob.manifest(_cfg(digits_cfg, "trainjob"), "img", INPUTS, "s3://b/o", name="j", namespace="ns")
    job["spec"]["trainer"]["numNodez"] = 2
    rendered = tmp_path / "bad.yaml"
    rendered.write_text(yaml.safe_dump(job))
    assert crd_schemas.validate(rendered, tmp_path / "rest.yaml") == -1


def test_distributed_block_is_ddp_with_nodes_nproc_engine():
    from tlops.config import TrainConfig

    t = TrainConfig(distributed={"nodes": 2, "procs_per_node": 4, "engine": "pytorchjob"})
    assert (t.distributed, t.nodes, t.nproc, t.engine) == ("ddp", 2, 4, "pytorchjob")
    assert (TrainConfig().nodes, TrainConfig().engine) == (1, "trainjob")
    assert TrainConfig(distributed="ddp", nodes=2).multinode and not TrainConfig(nodes=2).multinode
    with pytest.raises(Exception, match="unknown keys"):
        TrainConfig(distributed={"nodes": 2, "gpus": 1})
    with pytest.raises(Exception, match="trainjob"):
        TrainConfig(distributed={"nodes": 2, "engine": "ray"})


def test_artifact_uris():
    assert (
        trainjob.artifact_uri("minio://mlpipeline/v2/artifacts/p/r/t/trained")
        == "s3://mlpipeline/v2/artifacts/p/r/t/trained"
    )
    assert trainjob.artifact_uri("s3://b/k/") == "s3://b/k"
    with pytest.raises(Exception, match="S3 or MinIO"):
        trainjob.artifact_uri("gs://b/k")


def test_the_waiting_task_does_not_take_a_gpu(digits_cfg):
    """With train.nodes > 1 the KFP fine-tune task only watches the job: CPU pool, no accelerator."""
    from tlops.kfp.pipeline import compile_pipeline

    def fine_tune_resources(cfg, out):
        spec = next(yaml.safe_load_all(compile_pipeline(cfg, out).read_text()))
        return spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]["resources"]

    one = digits_cfg(kubernetes=GPU)
    many = digits_cfg(train={"distributed": {"nodes": 2}}, kubernetes=GPU)
    assert "accelerator" in fine_tune_resources(one, Path(one.workdir) / "one.yaml")
    assert "accelerator" not in fine_tune_resources(many, Path(many.workdir) / "many.yaml")


# --- submit / wait / cancel against a fake API server ---------------------------------------------


def _condition(type_: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": type_, "status": "True", "reason": reason, "message": message}]}


@pytest.fixture
def job(digits_cfg):
    def make(engine: str) -> dict:
        return trainjob.manifest(
            _cfg(digits_cfg, engine), "img", INPUTS, "s3://b/out", name="tlops-ft-t", namespace="ns"
        )

    return make


@pytest.mark.parametrize("engine,done", [("trainjob", "Complete"), ("pytorchjob", "Succeeded")])
def test_success_streams_node0_log(job, engine, done):
    running = {"conditions": [{"type": "Created", "status": "True"}]}
    api = FakeApi(
        [{}, running, _condition(done, "JobSucceeded" if engine == "pytorchjob" else "JobSetCompleted")],
        ["epoch 1/2 loss 0.9", "epoch 2/2 loss 0.4"],
    )
    lines: list[str] = []
    try:
        obj = trainjob.run_job(api.client(), job(engine), engine, poll=0.05, emit=lines.append)
    finally:
        api.stop()
    assert trainjob.outcome(engine, obj)[0] is True
    assert lines == ["epoch 1/2 loss 0.9", "epoch 2/2 loss 0.4"], "node 0's log, line by line"
    plural = trainjob.ENGINES[engine].plural
    assert ("POST", f"/apis/{trainjob.ENGINES[engine].api_version}/namespaces/ns/{plural}") in api.requests
    pods = [p for m, p in api.requests if "/pods?" in p]
    assert pods and ("job-completion-index%3D0" in pods[0] or "replica-type%3Dmaster" in pods[0])
    assert api.deleted == [], "a finished job is left for its owner (and its pods' logs)"


@pytest.mark.parametrize("engine", ["trainjob", "pytorchjob"])
def test_failure_fails_the_step_with_the_jobs_reason(job, engine):
    api = FakeApi([{}, _condition("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")], [])
    try:
        with pytest.raises(trainjob.JobFailed, match="DeadlineExceeded: TrainJob exceeded its activeDeadlineSeconds"):
            trainjob.run_job(api.client(), job(engine), engine, poll=0.05, emit=lambda s: None)
    finally:
        api.stop()


def test_failed_job_exits_the_task_nonzero_with_the_reason(monkeypatch, capsys, job):
    """What the KFP task prints and exits with: tlops' error line, exit status 1 (a TlopsError)."""
    from tlops.cli import main
    from tlops.errors import TlopsError

    assert issubclass(trainjob.JobFailed, TlopsError)
    api = FakeApi([_condition("Failed", "BackoffLimitExceeded", "rank 1 exited with 1")], [])
    monkeypatch.setattr(
        "tlops.cli.app", lambda *a, **k: trainjob.run_job(api.client(), job("pytorchjob"), "pytorchjob", poll=0.05)
    )
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        api.stop()
    assert e.value.code == 1
    assert "BackoffLimitExceeded: rank 1 exited with 1" in capsys.readouterr().err


def test_timeout_is_a_failure(job):
    api = FakeApi([{}], [])
    try:
        with pytest.raises(trainjob.JobFailed, match="did not finish"):
            trainjob.run_job(api.client(), job("trainjob"), "trainjob", poll=0.05, timeout=0.2, emit=lambda s: None)
    finally:
        api.stop()


@pytest.mark.parametrize("engine", ["trainjob", "pytorchjob"])
def test_sigterm_deletes_the_job(job, engine):
    """KFP cancels a run by deleting its pods: SIGTERM. The task deletes the job it submitted and
    exits like any interrupted tlops command (143)."""
    from tlops.interrupt import Interrupted, signals_raise

    api = FakeApi([{}], [])

    def cancel():
        while api.gets < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=cancel, daemon=True).start()
    try:
        with signals_raise(), pytest.raises(Interrupted) as e:
            trainjob.run_job(api.client(), job(engine), engine, poll=0.05, emit=lambda s: None)
    finally:
        api.stop()
    assert e.value.exit_code == 143
    assert api.deleted == [(trainjob.ENGINES[engine].plural, "ns", "tlops-ft-t")]
    (delete,) = [p for m, p in api.requests if m == "DELETE"]
    assert delete.endswith(f"/namespaces/ns/{trainjob.ENGINES[engine].plural}/tlops-ft-t")


def test_delete_of_a_job_already_gone_is_fine():
    api = FakeApi([{}], [])
    try:
        trainjob.delete(api.client(), "trainjob", "ns", "nope")
    finally:
        api.stop()


# --- the KFP task's multi-node body ----------------------------------------------------------------


def test_task_copies_the_artifact_the_job_published(s3, digits_cfg, tmp_path, monkeypatch):
    """run_fine_tune: artifact URIs -> the job's command; after the job, the artifact rank 0 published
    to the output URI is the task's output (which KFP then uploads)."""
    from s3srv import BUCKET

    from tlops.artifacts import read_artifact, write_artifact
    from tlops.storage import S3Storage

    made = tmp_path / "made"
    with write_artifact(made, "trained-models", config={}, inputs={}) as w:
        (w.path / "selection.json").write_text('{"selected": "fine-tune"}')
    out_uri = f"minio://{BUCKET}/v2/artifacts/run/fine-tune/trained"
    submitted: list[dict] = []

    def fake_run_job(api_client, job, engine, **kw):  # the nodes' work: rank 0 publishes the artifact
        submitted.append(job)
        S3Storage().upload_dir(made, trainjob.artifact_uri(out_uri))
        return {}

    monkeypatch.setattr(trainjob, "run_job", fake_run_job)
    monkeypatch.setattr("kubernetes.config.load_incluster_config", lambda: None)

    class Art:
        def __init__(self, uri, path):
            self.uri, self.path = uri, path

    output = Art(out_uri, str(tmp_path / "kfp-out"))
    os.makedirs(output.path)
    ins = {k: Art(f"minio://{BUCKET}/v2/{k}", "/unused") for k in ("dataset", "model", "features")}
    trainjob.run_fine_tune(_cfg(digits_cfg, "trainjob"), "img", ins, output)
    (job,) = submitted
    cmd = job["spec"]["trainer"]["command"]
    assert (
        f"dataset=s3://{BUCKET}/v2/dataset" in cmd
        and cmd[cmd.index("--out") + 1] == f"s3://{BUCKET}/v2/artifacts/run/fine-tune/trained"
    )
    art = read_artifact(Path(output.path), "trained-models")
    assert (art.path / "selection.json").read_text() == '{"selected": "fine-tune"}'


# --- the job's pods on the network ----------------------------------------------------------------


def test_job_pods_reach_each_other_and_the_artifact_store_only(digits_cfg):
    """k8s/base's ``trainer`` NetworkPolicy selects the pods the manifests label: the nodes connect to
    each other on any port (rendezvous, gloo/NCCL), to S3 and KFP's MinIO; nothing else reaches them."""
    from tests.test_k8s import K8S, KUBECTL, _render
    from tests.test_security_k8s import EXTERNAL, KUBEFLOW_NS, MLFLOW, OTHER, PIPELINE, reachable

    if KUBECTL is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    docs = _render(K8S / "overlays" / "dev")
    job = trainjob.manifest(_cfg(digits_cfg, "pytorchjob"), "img", INPUTS, "s3://b/o", name="j", namespace="ns")
    node = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    assert node == trainjob.LABELS
    for port in (29500, 29400, 41234):  # torchrun master, c10d store, a gloo/NCCL data port
        assert reachable(docs, node, node, port)
        assert not reachable(docs, PIPELINE, node, port) and not reachable(docs, OTHER, node, port)
    assert reachable(docs, node, EXTERNAL, 443) and reachable(docs, node, OTHER, 9000, KUBEFLOW_NS)
    assert not reachable(docs, node, MLFLOW, 5000) and not reachable(docs, node, OTHER, 5432)
