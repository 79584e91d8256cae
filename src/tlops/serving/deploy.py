"""``tlops deploy kserve NAME@ALIAS``: a KServe ``InferenceService`` whose predictor runs ``tlops serve``.

The predictor is a custom container (the tlops image) rather than KServe's ``modelFormat: mlflow``
runtime, because ``tlops serve`` is what follows the alias, guards the input contract and batches:
the pod loads ``NAME@ALIAS`` from the MLflow registry (artifacts through the tracking server's
``--serve-artifacts`` proxy, so no S3 credentials in the pod) and swaps versions when the alias
moves, so ``tlops promote`` / ``tlops rollback`` reach the running service without a redeploy.

The pod meets the Kubernetes "restricted" Pod Security profile: non-root uid 1000, no privilege
escalation, all capabilities dropped, RuntimeDefault seccomp, read-only root filesystem (the
model download and caches go to an emptyDir on /tmp), no service-account token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tlops.errors import ConfigError

API_VERSION = "serving.kserve.io/v1beta1"
PORT = 8080
UID = 1000
#: the container name KServe expects for a custom predictor
CONTAINER = "kserve-container"
#: pod labels the NetworkPolicies select on (k8s/overlays/serving/network-policy.yaml, base mlflow policy)
POD_LABELS = {"tlops.dev/role": "serving", "tlops.dev/mlflow-client": "true"}


def _dns_name(s: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    if not name:
        raise ConfigError(f"cannot make a Kubernetes name from '{s}'; pass --name")
    return name[:45].rstrip("-")  # KServe appends -predictor-... to the service name


def inference_service(
    model: str,
    *,
    image: str = "tlops:0.1.0",
    name: str | None = None,
    namespace: str | None = None,
    deployment_mode: str = "Standard",
    min_replicas: int = 1,
    max_replicas: int = 1,
    cpu_request: str = "1",
    memory_request: str = "2Gi",
    cpu_limit: str = "2",
    memory_limit: str = "4Gi",
    gpus: int = 0,
    gpu_resource: str = "nvidia.com/gpu",
    gpu_node_selector: dict[str, str] | None = None,
    gpu_tolerations: list[dict[str, Any]] | None = None,
    tracking_uri: str | None = None,
    mlflow_secret: str | None = None,
    poll_interval: float = 30.0,
    max_batch_size: int = 32,
    max_batch_wait_ms: float = 5.0,
    tmp_size: str = "4Gi",
) -> dict[str, Any]:
    """The ``InferenceService`` manifest (a dict) serving ``model`` (``NAME@ALIAS`` or ``NAME/VERSION``)."""
    if "@" not in model and "/" not in model:
        raise ConfigError(f"model '{model}': give NAME@ALIAS (e.g. {model}@champion) or NAME/VERSION")
    if deployment_mode not in ("Standard", "Knative"):
        raise ConfigError(f"deployment mode '{deployment_mode}': use Standard (plain Deployment) or Knative")
    registered = re.split(r"[@/]", model, maxsplit=1)[0]
    args = ["serve", model, "--host", "0.0.0.0", "--port", str(PORT), "--poll-interval", f"{poll_interval:g}"]
    args += ["--max-batch-size", str(max_batch_size), "--max-batch-wait-ms", f"{max_batch_wait_ms:g}"]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "value": "false"},
    ]
    if tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking_uri})
    else:  # the in-namespace tracking server of k8s/base
        ref = {"configMapKeyRef": {"name": "tlops-settings", "key": "MLFLOW_TRACKING_URI"}}
        env.append({"name": "MLFLOW_TRACKING_URI", "valueFrom": ref})
    if mlflow_secret:
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key}}})
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": cpu_request, "memory": memory_request},
        "limits": {"cpu": cpu_limit, "memory": memory_limit},
    }
    if gpus:
        resources["requests"][gpu_resource] = gpus
        resources["limits"][gpu_resource] = gpus

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": PORT},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container = {
        "name": CONTAINER,
        "image": image,
        "args": args,
        "ports": [{"name": "http1", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": resources,
        # loading the model from the registry takes a while: the startup probe allows 10 minutes
        "startupProbe": probe("/v2/health/live", 5, 120),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max(max_replicas, min_replicas),
        "labels": dict(POD_LABELS),
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}}],
    }
    if gpus:
        predictor["nodeSelector"] = dict(gpu_node_selector or {})
        predictor["tolerations"] = [dict(t) for t in (gpu_tolerations or [])]
    metadata: dict[str, Any] = {
        "name": _dns_name(name or registered),
        "labels": {"app.kubernetes.io/name": "tlops-serving", "tlops.dev/model": _dns_name(registered)},
        "annotations": {
            "serving.kserve.io/deploymentMode": deployment_mode,
            "tlops.dev/model": model,
        },
    }
    if namespace:
        metadata["namespace"] = namespace
    spec = {"predictor": predictor}
    return {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": metadata, "spec": spec}


def gpu_defaults() -> tuple[str, dict[str, str], list[dict[str, Any]]]:
    """The GPU pool contract of ``kubernetes.gpu`` (tlops.config.GpuConfig) and k8s/overlays/gpu."""
    from tlops.config import GpuConfig

    g = GpuConfig()
    tolerations = [t.model_dump(exclude_none=True) for t in g.tolerations]
    return g.accelerator_type, dict(g.node_selector), tolerations


def write(manifest: dict[str, Any], out: Path) -> Path:
    """The manifest as YAML, with a header saying how it was made."""
    header = (
        "# Generated by `tlops deploy kserve` (src/tlops/serving/deploy.py); regenerate rather than edit.\n"
        "# The predictor runs `tlops serve`, which follows the model alias: promote/rollback need no redeploy.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(manifest, sort_keys=False))
    return out
