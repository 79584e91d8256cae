"""``tlops deploy kserve`` and k8s/overlays/serving: the InferenceService, offline.

Validated against KServe's InferenceService CRD schema vendored in k8s/schemas/ (the same check
``make k8s-validate`` runs), checked against the Pod Security "restricted" rules and the
NetworkPolicies, and cross-checked with the kserve 0.21.0 Python SDK's models.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_k8s import K8S, KUBECTL, _render
from tests.test_security_k8s import (
    CLIENT,
    MLFLOW,
    OTHER,
    OWN_NS,
    PIPELINE,
    POSTGRES,
    _direction_allows,
    reachable,
    restricted_violations,
)

REPO = Path(__file__).resolve().parents[1]
OVERLAY = K8S / "overlays" / "serving"
SCHEMAS = K8S / "schemas"
sys.path.insert(0, str(SCHEMAS))
import crd_schemas  # noqa: E402

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")
SERVING = {"tlops.dev/role": "serving", "tlops.dev/mlflow-client": "true"}


def _deploy(tmp_path: Path, *args: str) -> dict:
    from typer.testing import CliRunner

    from tlops.cli import app

    out = tmp_path / "isvc.yaml"
    res = CliRunner().invoke(app, ["deploy", "kserve", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return yaml.safe_load(out.read_text())


def _check(tmp_path: Path, *docs: dict) -> int:
    rendered, rest = tmp_path / "rendered.yaml", tmp_path / "rest.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    return crd_schemas.validate(rendered, rest)


def test_overlay_manifest_is_what_the_documented_command_writes(tmp_path):
    isvc = _deploy(tmp_path, "digits-target@champion", "--mlflow-secret", "tlops-serving-mlflow")
    assert isvc == yaml.safe_load((OVERLAY / "inferenceservice.yaml").read_text())
    documented = (OVERLAY / "kustomization.yaml").read_text()
    assert "tlops deploy kserve digits-target@champion --mlflow-secret tlops-serving-mlflow" in documented


def test_predictor_runs_tlops_serve_ready_on_v2_and_restricted(tmp_path):
    isvc = _deploy(tmp_path, "digits-target@champion")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["args"][:2] == ["serve", "digits-target@champion"] and c["args"][2:4] == ["--host", "0.0.0.0"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "tlops-settings"
    assert restricted_violations(pred, "predictor") == []
    assert pred["automountServiceAccountToken"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"} and env["HOME"]["value"] == "/tmp"
    assert pred["labels"] == SERVING
    assert _check(tmp_path, isvc) == 1


def test_gpu_option_uses_the_gpu_pool_contract_and_validates(tmp_path):
    from tlops.config import GpuConfig

    isvc = _deploy(tmp_path, "sentiment@champion", "--gpus", "1", "--image", "reg.example.com/tlops:0.1.0")
    pred = isvc["spec"]["predictor"]
    g = GpuConfig()
    assert pred["containers"][0]["resources"]["limits"][g.accelerator_type] == 1
    assert pred["nodeSelector"] == g.node_selector
    assert pred["tolerations"] == [t.model_dump(exclude_none=True) for t in g.tolerations]
    assert _check(tmp_path, isvc) == 1


def test_vendored_schema_refuses_unknown_fields_and_wrong_types(tmp_path, capsys):
    isvc = _deploy(tmp_path, "digits-target@champion")
    isvc["spec"]["predictor"]["minReplicaz"] = 1
    isvc["spec"]["predictor"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = "yes"
    assert _check(tmp_path, isvc) == -1
    err = capsys.readouterr().err
    assert "spec.predictor: Additional properties are not allowed ('minReplicaz' was unexpected)" in err
    assert "containers.0.securityContext.readOnlyRootFilesystem: 'yes' is not of type 'boolean'" in err
    doc = json.loads((SCHEMAS / "serving.kserve.io_inferenceservices.v1beta1.json").read_text())
    assert doc["source"].startswith("kserve/kserve@") and doc["release"].startswith("v0.")
    assert len(doc["sha256"]) == 64 and (SCHEMAS / "README.md").read_text().count(doc["sha256"]) == 1


def test_emitted_fields_exist_in_the_kserve_sdk_models(tmp_path):
    """The schema is vendored from an older release than the pinned kserve: every predictor field
    we write must also be in kserve 0.21.0's own models."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # kserve parses argv on import
    try:
        from kserve.models import V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    finally:
        sys.argv = saved
    isvc = _deploy(tmp_path, "digits-target@champion", "--gpus", "1", "--mlflow-secret", "s")
    assert set(isvc["spec"]) <= set(V1beta1InferenceServiceSpec.attribute_map.values())
    assert set(isvc["spec"]["predictor"]) <= set(V1beta1PredictorSpec.attribute_map.values())


@needs_kubectl
def test_serving_overlay_renders_validates_and_its_network_paths(tmp_path):
    docs = _render(OVERLAY)
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    assert isvc["metadata"]["namespace"] == "tlops"
    assert _check(tmp_path, *docs) == 1
    rest = [d for d in yaml.safe_load_all((tmp_path / "rest.yaml").read_text()) if d]
    assert len(rest) == len(docs) - 1 and "InferenceService" not in {d["kind"] for d in rest}
    assert reachable(docs, SERVING, MLFLOW, 5000)  # the registry and, via its proxy, the model files
    # callers from other namespaces (an ingress gateway) reach :8080; in the namespace, default-deny egress
    # keeps everything else (the pipeline included) away
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert _direction_allows(policies, SERVING, "Ingress", OTHER, {"kubernetes.io/metadata.name": "gateway"}, 8080)
    assert not _direction_allows(policies, SERVING, "Ingress", OTHER, OWN_NS, 9000)
    assert not reachable(docs, PIPELINE, SERVING, 8080) and not reachable(docs, CLIENT, SERVING, 8080)
    assert not reachable(docs, SERVING, POSTGRES, 5432) and not reachable(docs, SERVING, MLFLOW, 5432)
    assert not reachable(docs, SERVING, PIPELINE, 8080)


@needs_kubectl
def test_validate_script_fails_on_a_broken_inference_service(tmp_path):
    from tests.test_k8s import KUBERNETES_VALIDATE, ONE_VERSION, VALIDATE, _run

    shutil.copytree(K8S, tmp_path / "k8s")
    isvc = tmp_path / "k8s" / "overlays" / "serving" / "inferenceservice.yaml"
    isvc.write_text(isvc.read_text().replace("minReplicas:", "minReplicaz:"))
    env = {"K8S_VERSIONS": ONE_VERSION, "KUBERNETES_VALIDATE": KUBERNETES_VALIDATE}
    proc = _run("bash", str(tmp_path / "k8s" / "validate.sh"), str(isvc.parent), **env)
    assert proc.returncode == 1 and "'minReplicaz' was unexpected" in proc.stdout + proc.stderr
    ok = _run("bash", str(VALIDATE), str(OVERLAY), K8S_VERSIONS=ONE_VERSION)
    assert ok.returncode == 0 and "(1 of them custom resources, against k8s/schemas/)" in ok.stdout, ok.stdout
