"""Multi-node fine-tuning on a cluster: the KFP fine-tune task runs the step as a Kubeflow job.

With ``train.nodes`` > 1 one pod is not enough, and tlops does not schedule pods itself: the
KFP fine-tune task (``tlops.kfp.task.run_task``) submits a job to the engine the cluster has
(``train.engine``) and acts for it:

* ``trainjob``: Kubeflow Trainer's ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) on the
  ``torch-distributed`` ClusterTrainingRuntime the Trainer ships; ``trainer.numNodes`` /
  ``numProcPerNode``, the GPU node pool through ``runtimePatches`` (the fields a TrainJob may
  patch of its runtime's pod template);
* ``pytorchjob``: the Training Operator's ``PyTorchJob`` (``kubeflow.org/v1``), one Master and
  ``nodes - 1`` Workers, ``nprocPerNode``.

Every node runs the tlops image's ``torchrun --nnodes N --nproc-per-node P -m
tlops.runners.torchrun`` (the fine-tune step as one DDP rank per process; the engine sets the
node rank and rendezvous address in torchrun's ``PET_*`` variables), with the resources, node
selector, tolerations, ``/dev/shm`` and security context the single-pod fine-tune task gets
(``kubernetes.gpu``, ``tlops.kfp.pipeline.task_configurer``). The pods share no disk with the
task: the inputs are read from, and the output written to, the KFP artifacts' object-store URIs
(``minio://`` is MinIO's S3 API); the config travels in the command.

The task then (:func:`run_job`) creates the job, polls its conditions, streams the log of node 0
(the rank that writes the artifact) into the task log, raises :class:`JobFailed` with the job's
reason and message when it fails, and deletes the job when the task is cancelled (SIGTERM ->
``tlops.interrupt.Interrupted``). Calls go through the ``kubernetes`` client's
``CustomObjectsApi`` / ``CoreV1Api``; the Role they need is ``k8s/base/pipeline-rbac.yaml``.
The manifests are validated against the CRD schemas vendored in ``k8s/schemas/``
(``tests/test_trainjob.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from tlops.errors import TlopsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the training container's name (what the engine's controller expects)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


ENGINES = {
    "trainjob": Engine("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "node"),
    "pytorchjob": Engine("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "pytorch"),
}
#: the ClusterTrainingRuntime Kubeflow Trainer installs for torchrun jobs (replicated job "node")
RUNTIME = "torch-distributed"
#: who owns the TrainJob's runtime patch (runtimePatches are keyed by manager)
PATCH_MANAGER = "tlops.dev/kfp-fine-tune"
#: the task's settings the nodes need too: where S3 and MLflow are (credentials come from Secrets)
PASSED_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
# done conditions per engine: (success type, failure type)
DONE = {"trainjob": ("Complete", "Failed"), "pytorchjob": ("Succeeded", "Failed")}
#: the job's pods: k8s/base/network-policies.yaml lets pods with this role reach each other
LABELS = {"app.kubernetes.io/part-of": "tlops", "tlops.dev/role": "trainer"}
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class JobFailed(TlopsError):
    """The multi-node job failed; the message is the job's reason and message."""


def in_cluster() -> bool:
    """Inside a pod (the kubelet sets these); kfp.local and ``tlops run`` are not."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def artifact_uri(uri: str) -> str:
    """A KFP artifact URI as the location the nodes read/write: ``s3://`` as is, KFP's MinIO
    ``minio://bucket/key`` as ``s3://bucket/key`` (the S3 endpoint points at MinIO)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://") :].rstrip("/")
    raise TlopsError(
        f"multi-node fine-tuning needs the pipeline root on S3 or MinIO (the job's pods read the artifacts "
        f"from it); this artifact is at {uri!r}"
    )


def worker_command(cfg: Any, inputs: dict[str, str], out: str) -> list[str]:
    """Each node's command: torchrun with the job's shape; node rank and master address come from
    the engine (``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``)."""
    cmd = [
        "torchrun",
        f"--nnodes={cfg.train.nodes}",
        f"--nproc-per-node={procs_per_node(cfg)}",
        "-m",
        "tlops.runners.torchrun",
        "--config-json",
        json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")),
        "--out",
        out,
    ]
    for name, uri in inputs.items():
        cmd += ["--in", f"{name}={uri}"]
    return cmd


def procs_per_node(cfg: Any) -> int:
    """``train.nproc``, else one per GPU of the pool (``kubernetes.gpu.accelerator_limit``), else 1."""
    if cfg.train.nproc:
        return int(cfg.train.nproc)
    gpu = cfg.kubernetes.gpu
    return gpu.accelerator_limit if gpu is not None else 1


def job_name(prefix: str = "tlops-ft") -> str:
    """Unique per submission (a retried task submits a new job), DNS-1035, well under 63 characters."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _resources(cfg: Any) -> dict[str, dict[str, str]]:
    k = cfg.kubernetes
    r = k.gpu or k.resources
    requests = {n: v for n, v in (("cpu", r.cpu_request), ("memory", r.memory_request)) if v}
    limits = {n: v for n, v in (("cpu", r.cpu_limit), ("memory", r.memory_limit)) if v}
    if k.gpu is not None:
        requests[k.gpu.accelerator_type] = limits[k.gpu.accelerator_type] = str(k.gpu.accelerator_limit)
    return {"requests": requests, "limits": limits}


def _env(cfg: Any) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": n, "value": os.environ[n]} for n in PASSED_ENV if os.environ.get(n)]
    for secret in cfg.kubernetes.secrets:
        for var, key in secret.env.items():
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    return env


def _pod_parts(cfg: Any) -> dict[str, Any]:
    """What the single-pod fine-tune task gets (tlops.kfp.pipeline.task_configurer), for each node."""
    from tlops.kfp import RUN_AS

    gpu = cfg.kubernetes.gpu
    tolerations = [{k: v for k, v in t.model_dump().items() if v is not None} for t in gpu.tolerations] if gpu else []
    shm = bool(gpu and gpu.shm_size)
    return {
        "labels": dict(LABELS),
        "node_selector": dict(gpu.node_selector) if gpu else {},
        "tolerations": tolerations,
        "pod_security": {"runAsUser": RUN_AS, "runAsGroup": RUN_AS, "runAsNonRoot": True},
        "container_security": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gpu.shm_size}}] if shm else [],
        "mounts": [{"name": "dshm", "mountPath": "/dev/shm"}] if shm else [],
    }


def manifest(cfg: Any, image: str, inputs: dict[str, str], out: str, *, name: str, namespace: str) -> dict[str, Any]:
    """The ``train.engine`` job running the fine-tune step on ``train.nodes`` nodes."""
    engine = ENGINES[cfg.train.engine]
    parts = _pod_parts(cfg)
    command = worker_command(cfg, inputs, out)
    meta = {"name": name, "namespace": namespace, "labels": {**parts["labels"], "tlops.dev/step": "fine-tune"}}
    if cfg.train.engine == "trainjob":
        pod_spec: dict[str, Any] = {
            "securityContext": parts["pod_security"],
            "containers": [
                {
                    "name": engine.container,
                    "securityContext": parts["container_security"],
                    "volumeMounts": parts["mounts"],
                }
            ],
        }
        if parts["node_selector"]:
            pod_spec["nodeSelector"] = parts["node_selector"]
        if parts["tolerations"]:
            pod_spec["tolerations"] = parts["tolerations"]
        if parts["volumes"]:
            pod_spec["volumes"] = parts["volumes"]
        node_job = {
            "name": "node",
            "template": {"spec": {"template": {"metadata": {"labels": parts["labels"]}, "spec": pod_spec}}},
        }
        return {
            "apiVersion": engine.api_version,
            "kind": engine.kind,
            "metadata": meta,
            "spec": {
                "runtimeRef": {"apiGroup": engine.group, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
                "trainer": {
                    "image": image,
                    "command": command,
                    "numNodes": cfg.train.nodes,
                    "numProcPerNode": procs_per_node(cfg),
                    "resourcesPerNode": _resources(cfg),
                    "env": _env(cfg),
                },
                "runtimePatches": [
                    {
                        "manager": PATCH_MANAGER,
                        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_job]}}},
                    }
                ],
            },
        }
    container = {
        "name": engine.container,
        "image": image,
        "command": command,
        "env": _env(cfg),
        "resources": _resources(cfg),
        "securityContext": parts["container_security"],
        "volumeMounts": parts["mounts"],
    }
    pod_spec = {"securityContext": parts["pod_security"], "containers": [container], "volumes": parts["volumes"]}
    if parts["node_selector"]:
        pod_spec["nodeSelector"] = parts["node_selector"]
    if parts["tolerations"]:
        pod_spec["tolerations"] = parts["tolerations"]
    template = {"metadata": {"labels": parts["labels"]}, "spec": pod_spec}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if cfg.train.nodes > 1:
        replicas["Worker"] = {"replicas": cfg.train.nodes - 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": engine.api_version,
        "kind": engine.kind,
        "metadata": meta,
        "spec": {
            "nprocPerNode": str(procs_per_node(cfg)),
            # a failed rank fails the job (the rerun resumes from the step's checkpoints, not a pod restart)
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def node0_selector(engine: str, name: str) -> str:
    """Label selector of node 0's pod (global rank 0, the one whose log says what the step did)."""
    if engine == "trainjob":  # JobSet's labels on the Indexed Job's pods
        return (
            f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
            "batch.kubernetes.io/job-completion-index=0"
        )
    return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"


def outcome(engine: str, obj: dict[str, Any]) -> tuple[bool, str, str] | None:
    """None while running; else (succeeded, reason, message) from the job's done condition."""
    ok_type, failed_type = DONE[engine]
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in (ok_type, failed_type):
            return c["type"] == ok_type, c.get("reason") or c["type"], c.get("message") or ""
    return None


class _LogStreamer(threading.Thread):
    """Copies node 0's log into this process's log, line by line, until the container ends."""

    def __init__(self, core: Any, namespace: str, selector: str, container: str, emit: Callable[[str], None]):
        super().__init__(daemon=True, name="tlops-job-log")
        self.core, self.namespace, self.selector, self.container, self.emit = core, namespace, selector, container, emit
        self.stop = threading.Event()
        self.following = threading.Event()  # node 0's pod was found and its log is being read

    def run(self) -> None:
        """The log is a convenience: an API error here is a warning, the job's status decides."""
        try:
            self._follow()
        except Exception as e:  # noqa: BLE001 - any client/transport error
            if not self.stop.is_set():
                log.warning("fine-tune: stopped streaming node 0's log (%s: %s)", type(e).__name__, e)

    def _follow(self) -> None:
        while not self.stop.is_set():
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
            running = [p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")]
            if running:
                break
            self.stop.wait(1.0)
        else:
            return
        pod = running[0].metadata.name
        self.following.set()
        resp = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=self.container, follow=True, _preload_content=False
        )
        buf = b""  # chunks are not lines: keep the unfinished last line for the next chunk
        try:
            for chunk in resp.stream():
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    self.emit(line.decode("utf-8", errors="replace").rstrip("\r"))
                if self.stop.is_set():
                    break
            if buf:
                self.emit(buf.decode("utf-8", errors="replace"))
        finally:
            resp.release_conn()


def run_job(
    api_client: Any,
    job: dict[str, Any],
    engine: str,
    *,
    poll: float = 5.0,
    timeout: float | None = None,
    emit: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Create ``job``, wait for its done condition while streaming node 0's log, return the finished
    object. Raises :class:`JobFailed` (the job's reason and message) when it fails or ``timeout``
    passes; deletes the job when interrupted (SIGTERM/SIGINT: the KFP run was cancelled)."""
    from kubernetes import client

    from tlops.interrupt import Interrupted

    e = ENGINES[engine]
    api = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    where = f"{e.kind} {ns}/{name}"
    api.create_namespaced_custom_object(e.group, e.version, ns, e.plural, job)
    log.info("fine-tune: submitted %s (%s nodes)", where, _nodes(job, engine))
    streamer = _LogStreamer(core, ns, node0_selector(engine, name), e.container, emit or (lambda s: log.info("%s", s)))
    streamer.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            obj = api.get_namespaced_custom_object(e.group, e.version, ns, e.plural, name)
            done = outcome(engine, obj)
            if done is not None:
                ok, reason, message = done
                if streamer.following.is_set():
                    streamer.join(timeout=10)  # the rest of node 0's log, already written
                if not ok:
                    raise JobFailed(f"fine-tune: {where} failed: {reason}: {message}".rstrip(": "))
                log.info("fine-tune: %s %s", where, reason)
                return obj
            if deadline is not None and time.monotonic() > deadline:
                raise JobFailed(f"fine-tune: {where} did not finish in {timeout:.0f}s")
            time.sleep(poll)
    except Interrupted:
        log.warning("fine-tune: cancelled; deleting %s", where)
        delete(api_client, engine, ns, name)
        raise
    finally:
        streamer.stop.set()


def delete(api_client: Any, engine: str, namespace: str, name: str) -> None:
    """Delete the job and (foreground propagation) its pods; a job already gone is fine."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    e = ENGINES[engine]
    try:
        client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
            e.group, e.version, namespace, e.plural, name, body=client.V1DeleteOptions(propagation_policy="Foreground")
        )
    except ApiException as err:
        if err.status != 404:
            raise


def _nodes(job: dict[str, Any], engine: str) -> int:
    if engine == "trainjob":
        return job["spec"]["trainer"]["numNodes"]
    return sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())


def namespace() -> str:
    """The namespace this pod runs in (the KFP run's: the job runs next to the task)."""
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


def run_fine_tune(cfg: Any, image: str, inputs: dict[str, Any], output: Any) -> None:
    """The KFP fine-tune task's body when ``train.nodes`` > 1 on a cluster: run the job on the
    task's artifacts and copy the artifact it wrote into the task's output path."""
    import shutil
    import tempfile
    from pathlib import Path

    from kubernetes import client, config

    from tlops.storage import S3Storage

    out = artifact_uri(output.uri)
    ins = {k: artifact_uri(a.uri) for k, a in inputs.items()}
    config.load_incluster_config()
    job = manifest(cfg, image, ins, out, name=job_name(), namespace=namespace())
    run_job(client.ApiClient(), job, cfg.train.engine)
    with tempfile.TemporaryDirectory(prefix="tlops-job-out-") as tmp:
        local = Path(tmp) / "out"
        S3Storage().download_dir(out, local)
        shutil.copytree(local, output.path, dirs_exist_ok=True)
