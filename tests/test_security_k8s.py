"""Network and pod hardening, checked offline (docs/security.md).

- every rendered workload (base and every overlay) meets Pod Security "restricted", with a
  read-only root filesystem;
- every task of the compiled KFP pipeline runs non-root, carries the pipeline pod label the
  NetworkPolicies select, and installs nothing at run time;
- the NetworkPolicies, evaluated: who can reach what (default deny, explicit allows);
- every RBAC grant of the pipeline Role has a named caller, and tlops' own code calls no
  Kubernetes API;
- scoped credentials: MinIO's root user only in MinIO and the bucket Job, MLflow and the
  pipeline each with their own S3 user;
- ``REQUIRE_DIGESTS=1 k8s/validate.sh`` refuses images named by tag (the production check).
"""

from __future__ import annotations

import re
import shutil
from typing import Any

import pytest
import yaml

from tests.test_k8s import K8S, OVERLAYS, REPO, VALIDATE, _containers, _pod_specs, _render, _run

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

COMPILED = REPO / "pipelines" / "transfer_learning" / "digits-target.yaml"
# Pod Security "restricted": the volume types a pod may use
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _render(K8S / ("base" if name == "base" else f"overlays/{name}")) for name in ("base", *OVERLAYS)}


# --- Pod Security "restricted" + read-only root ---------------------------------------------------


def restricted_violations(spec: dict, where: str) -> list[str]:
    """What keeps a pod spec from Pod Security "restricted" (and from a read-only root)."""
    bad = []
    pod_sc = spec.get("securityContext", {})
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        bad.append(f"{where}: host namespaces")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"{where}: volume {v['name']} of type {sorted(kinds)}")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc, w = c.get("securityContext", {}), f"{where} container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{w}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{w}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{w}: capabilities {caps}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad.append(f"{w}: runAsNonRoot not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{w}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{w}: seccompProfile {seccomp}")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{w}: root filesystem writable")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{w}: hostPort")
    return bad


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_workload_meets_pod_security_restricted(rendered, name):
    workloads = list(_pod_specs(rendered[name]))
    assert workloads
    bad = [
        v for obj, spec in workloads for v in restricted_violations(spec, f"{obj['kind']}/{obj['metadata']['name']}")
    ]
    assert bad == []


def test_the_checker_catches_each_violation():
    good = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    assert restricted_violations(good, "p") == []
    breakages = {
        "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "runAsNonRoot": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda s: s["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda s: s["securityContext"].pop("seccompProfile"),
        "root filesystem": lambda s: s["containers"][0]["securityContext"].pop("readOnlyRootFilesystem"),
        "host namespaces": lambda s: s.update(hostNetwork=True),
        "hostPath": lambda s: s.update(volumes=[{"name": "v", "hostPath": {"path": "/"}}]),
    }
    for what, breakage in breakages.items():
        spec = yaml.safe_load(yaml.safe_dump(good))
        breakage(spec)
        assert restricted_violations(spec, "p"), what


def test_dev_namespace_enforces_restricted(rendered):
    (ns,) = [d for d in rendered["dev"] if d["kind"] == "Namespace"]
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"


# --- compiled KFP tasks -----------------------------------------------------------------------


def test_compiled_tasks_run_non_root_labelled_and_install_nothing():
    """The committed compile (test_kfp checks it is fresh): what the cluster will run."""
    text = COMPILED.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, ex in executors.items():
        cmd = " ".join(ex["container"].get("command", []) + ex["container"].get("args", []))
        assert "pip install" not in cmd and "pip3 install" not in cmd, name
        sc = k8s[name]["securityContext"]
        assert sc["runAsNonRoot"] is True and int(sc["runAsUser"]) != 0 and int(sc["runAsGroup"]) != 0, name
        assert k8s[name]["podMetadata"]["labels"]["tlops.dev/role"] == "pipeline", name
    assert "pip install" not in text


# --- NetworkPolicies, evaluated ---------------------------------------------------------------

EXTERNAL = {"__external__": "true"}  # an address outside the cluster (S3, the Kubernetes API)
KUBEFLOW_NS = {"kubernetes.io/metadata.name": "kubeflow"}
OWN_NS = {"kubernetes.io/metadata.name": "tlops"}


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        assert e["operator"] == "In", e  # the only operator these manifests use
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _peer_matches(peer: dict, labels: dict, ns_labels: dict) -> bool:
    if "ipBlock" in peer:
        return labels is EXTERNAL
    if labels is EXTERNAL:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], ns_labels):
            return False
    elif ns_labels != OWN_NS:
        return False
    return _selects(peer.get("podSelector"), labels)


def _port_ok(rule: dict, port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


def _direction_allows(policies, pod: dict, direction: str, peer: dict, peer_ns: dict, port: int) -> bool:
    mine = [p for p in policies if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)]
    if not mine:
        return True  # not isolated in this direction
    key, side = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for p in mine:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(side)
            if _port_ok(rule, port) and (not peers or any(_peer_matches(x, peer, peer_ns) for x in peers)):
                return True
    return False


def reachable(docs, src: dict, dst: dict, port: int, dst_ns: dict = OWN_NS) -> bool:
    """Can a pod labelled ``src`` (in the tlops namespace) open ``port`` on ``dst``?"""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    egress = _direction_allows(policies, src, "Egress", dst, dst_ns, port)
    if dst is EXTERNAL or dst_ns != OWN_NS:
        return egress  # the other end is not governed by these policies
    return egress and _direction_allows(policies, dst, "Ingress", src, OWN_NS, port)


PIPELINE = {"tlops.dev/role": "pipeline", "app.kubernetes.io/part-of": "tlops"}
MLFLOW = {"app.kubernetes.io/name": "mlflow"}
POSTGRES = {"app.kubernetes.io/name": "mlflow-postgres"}
MINIO = {"app.kubernetes.io/name": "minio"}
BUCKET_JOB = {"app.kubernetes.io/name": "minio-create-buckets"}
CLIENT = {"tlops.dev/mlflow-client": "true"}
OTHER = {"app": "anything-else"}


def test_network_paths_dev(rendered):
    docs = rendered["dev"]
    allowed = [
        (PIPELINE, MLFLOW, 5000),
        (PIPELINE, MINIO, 9000),
        (PIPELINE, EXTERNAL, 443),  # S3, model sources, Kubernetes API
        (MLFLOW, POSTGRES, 5432),
        (MLFLOW, MINIO, 9000),
        (MLFLOW, EXTERNAL, 443),
        (BUCKET_JOB, MINIO, 9000),
        (CLIENT, MLFLOW, 5000),
    ]
    denied = [
        (PIPELINE, POSTGRES, 5432),  # the database is MLflow's alone
        (PIPELINE, MINIO, 9001),  # the console only through port-forward
        (PIPELINE, EXTERNAL, 22),
        (OTHER, MLFLOW, 5000),  # an unlabelled pod in the namespace
        (OTHER, MINIO, 9000),
        (OTHER, EXTERNAL, 443),
        (BUCKET_JOB, MLFLOW, 5000),
        (BUCKET_JOB, EXTERNAL, 443),
        (MLFLOW, PIPELINE, 8080),
        (MINIO, EXTERNAL, 443),
        (POSTGRES, EXTERNAL, 443),
        (MLFLOW, OTHER, 80),
    ]
    for src, dst, port in allowed:
        assert reachable(docs, src, dst, port), (src, dst, port)
    for src, dst, port in denied:
        assert not reachable(docs, src, dst, port), (src, dst, port)
    # the ingress controller's namespace, once labelled, reaches the UI; other namespaces do not
    assert _direction_allows(
        [d for d in docs if d["kind"] == "NetworkPolicy"],
        MLFLOW,
        "Ingress",
        {"app": "ingress"},
        {"tlops.dev/mlflow-ingress": "true"},
        5000,
    )
    assert not reachable(docs, OTHER, MLFLOW, 5000, dst_ns=OWN_NS)
    # KFP control plane and DNS
    assert reachable(docs, PIPELINE, {"app": "ml-pipeline"}, 8887, dst_ns=KUBEFLOW_NS)
    assert not reachable(docs, MLFLOW, {"app": "ml-pipeline"}, 8887, dst_ns=KUBEFLOW_NS)
    dns_ns = {"kubernetes.io/metadata.name": "kube-system"}
    for src in (PIPELINE, MLFLOW, OTHER):
        assert reachable(docs, src, {"k8s-app": "kube-dns"}, 53, dst_ns=dns_ns)


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_default_deny_in_every_rendering(rendered, name):
    deny = [d for d in rendered[name] if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "default-deny"]
    assert len(deny) == 1
    assert deny[0]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # without MinIO (base, gpu) the pipeline reaches S3 over HTTPS and MLflow, nothing else in-namespace
    docs = rendered[name]
    assert reachable(docs, PIPELINE, MLFLOW, 5000) and not reachable(docs, PIPELINE, POSTGRES, 5432)
    assert not reachable(docs, OTHER, MLFLOW, 5000)


def test_every_workload_is_selected_by_an_allow_policy(rendered):
    """A workload no allow policy names would be cut off by the default deny."""
    docs = rendered["dev"]
    allows = [d for d in docs if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]]
    for obj, _ in _pod_specs(docs):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(p["spec"]["podSelector"], labels) for p in allows), obj["metadata"]["name"]


# --- RBAC: every grant has a caller -------------------------------------------------------------

# (apiGroup, resource, verb, resourceName or None) -> who makes that call, and which call
CALLERS = {
    ("argoproj.io", "workflowtaskresults", "create", None): "Argo executor >= 3.4: reports a step's outputs",
    ("argoproj.io", "workflowtaskresults", "patch", None): "Argo executor >= 3.4: updates a step's outputs",
    ("", "configmaps", "get", "kfp-launcher"): "KFP v2 driver/launcher: the namespace's pipeline-root config",
    ("", "secrets", "get", "mlpipeline-minio-artifact"): "KFP v2 launcher: the pipeline-root store credentials",
    # tlops.kfp.trainjob (train.nodes > 1): submit the job, poll its conditions, delete it on cancel
    ("trainer.kubeflow.org", "trainjobs", "create", None): "trainjob.run_job: create_namespaced_custom_object",
    ("trainer.kubeflow.org", "trainjobs", "get", None): "trainjob.run_job: get_namespaced_custom_object",
    ("trainer.kubeflow.org", "trainjobs", "delete", None): "trainjob.delete: delete_namespaced_custom_object",
    ("kubeflow.org", "pytorchjobs", "create", None): "trainjob.run_job: create_namespaced_custom_object",
    ("kubeflow.org", "pytorchjobs", "get", None): "trainjob.run_job: get_namespaced_custom_object",
    ("kubeflow.org", "pytorchjobs", "delete", None): "trainjob.delete: delete_namespaced_custom_object",
    ("", "pods", "list", None): "trainjob._LogStreamer: list_namespaced_pod (node 0 by label selector)",
    ("", "pods/log", "get", None): "trainjob._LogStreamer: read_namespaced_pod_log (follow)",
}


def _grants(role: dict) -> set[tuple]:
    out = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        out.add((group, res, verb, name))
    return out


def test_every_rbac_grant_has_a_caller_and_every_caller_a_grant(rendered):
    (role,) = [d for d in rendered["dev"] if d["kind"] == "Role" and d["metadata"]["name"] == "tlops-pipeline"]
    grants = _grants(role)
    assert grants - set(CALLERS) == set(), "grants nobody calls: remove them, or name the caller in CALLERS"
    assert set(CALLERS) - grants == set(), "a call the pipeline makes is not granted"
    text = (K8S / "base" / "pipeline-rbac.yaml").read_text()
    for _, res, _, name in CALLERS:
        assert (name or res) in text  # and the manifest explains it


def test_tlops_code_calls_no_kubernetes_api():
    """The grants above are for KFP/Argo and the multi-node fine-tune task (tlops.kfp.trainjob); every
    other piece of tlops reaches the cluster through env vars only."""
    api = re.compile(r"^\s*(from kubernetes\b|import kubernetes\b)|CoreV1Api|load_incluster_config", re.M)
    hits = [str(p.relative_to(REPO)) for p in (REPO / "src" / "tlops").rglob("*.py") if api.search(p.read_text())]
    assert hits == ["src/tlops/kfp/trainjob.py"]
    text = (REPO / "src" / "tlops" / "kfp" / "trainjob.py").read_text()
    calls = set(re.findall(r"\.(create|get|delete)_namespaced_custom_object\(", text))
    assert calls == {"create", "get", "delete"}, "the custom-object verbs granted are the ones called"
    assert "list_namespaced_pod(" in text and "read_namespaced_pod_log(" in text


# --- scoped credentials ---------------------------------------------------------------------------


def _secret_users(docs) -> dict[str, set[str]]:
    users: dict[str, set[str]] = {}
    for obj, _, c, _ in _containers(docs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                users.setdefault(ref["name"], set()).add(obj["metadata"]["name"])
    return users


def test_each_workload_gets_its_own_s3_user(rendered):
    users = _secret_users(rendered["dev"])
    assert users["tlops-minio-root"] == {"minio", "minio-create-buckets"}  # root: MinIO and the bucket Job
    assert users["tlops-mlflow-s3"] == {"mlflow", "minio-create-buckets"}  # the Job creates that user
    assert users["tlops-s3"] == {"minio-create-buckets"}  # pipeline pods get it through their KFP config
    for name in ("base", "gpu"):
        assert "tlops-s3" not in _secret_users(rendered[name]).get("mlflow", set())
        assert "tlops-minio-root" not in _secret_users(rendered[name])
    (job,) = [d for d in rendered["dev"] if d["kind"] == "Job"]
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert 'scoped tlops-mlflow "$MLFLOW_BUCKET"' in script and 'scoped tlops-pipeline "$DATA_BUCKET"' in script
    assert '"Resource":["arn:aws:s3:::%s/*"]' in script and "s3:*" not in script


# --- images by digest (production) --------------------------------------------------------------


def test_require_digests_refuses_tags_and_accepts_digests(tmp_path):
    proc = _run("bash", str(VALIDATE), str(K8S / "overlays" / "gpu"), K8S_VERSIONS="1.37.0", REQUIRE_DIGESTS="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "image 'tlops:0.1.0' is not pinned by digest" in out, out

    shutil.copytree(K8S / "base", tmp_path / "base")
    prod = tmp_path / "overlays" / "prod"
    prod.mkdir(parents=True)
    digest = "sha256:" + "0" * 64
    prod.joinpath("kustomization.yaml").write_text(
        "namespace: tlops\nresources:\n  - ../../base\nimages:\n"
        f"  - name: tlops\n    digest: {digest}\n  - name: postgres\n    digest: {digest}\n"
    )
    proc = _run("bash", str(VALIDATE), str(prod), K8S_VERSIONS="1.37.0", REQUIRE_DIGESTS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docs_security_page_names_every_control():
    text = (REPO / "docs" / "security.md").read_text()
    for needle in (
        "tlops-auth",
        "default-deny",
        "restricted",
        "REQUIRE_DIGESTS",
        "install_kfp_package",
        "readOnlyRootFilesystem",
        "MLFLOW_TRACKING_USERNAME",
        "no-new-privileges",
    ):
        assert needle in text, needle
