"""The Kubernetes manifests under k8s/: offline validation and the properties we rely on.

Everything here renders the kustomizations with `kubectl kustomize` and validates them with
`kubernetes-validate` (both offline); no cluster is needed. Skipped where kubectl or
kubernetes-validate is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
VALIDATE = K8S / "validate.sh"
OVERLAYS = ("dev", "gpu", "serving")
NAMESPACE = "tlops"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
ONE_VERSION = "1.37.0"  # failure-path tests: one schema version is enough (and faster)

KUBECTL = shutil.which("kubectl")
_venv_kv = REPO / ".venv" / "bin" / "kubernetes-validate"
KUBERNETES_VALIDATE = str(_venv_kv) if _venv_kv.exists() else shutil.which("kubernetes-validate")

pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed"),
    pytest.mark.skipif(KUBERNETES_VALIDATE is None, reason="install the dev extra: pip install -e .[dev]"),
]


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def _render(path: Path) -> list[dict[str, Any]]:
    proc = _run(KUBECTL or "kubectl", "kustomize", str(path))
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {"base": _render(K8S / "base")}
    out.update({name: _render(K8S / "overlays" / name) for name in OVERLAYS})
    return out


def _one(docs: list[dict], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    for d in docs:
        if d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif d["kind"] in WORKLOAD_KINDS:
            yield d, d["spec"]["template"]["spec"]


def _containers(docs: list[dict], init: bool = True) -> Iterator[tuple[dict, dict, dict, bool]]:
    """(object, pod spec, container, is_init) for every container of every workload."""
    for obj, spec in _pod_specs(docs):
        for c in spec.get("containers", []):
            yield obj, spec, c, False
        if init:
            for c in spec.get("initContainers", []):
                yield obj, spec, c, True


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _where(obj: dict, c: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']} container {c['name']}"


# --- the validator ----------------------------------------------------------------------------


def test_validate_script_passes_for_base_and_every_overlay():
    proc = _run("bash", str(VALIDATE), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for label in ("base", *(f"overlays/{n}" for n in OVERLAYS), "base/secrets.example.yaml"):
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"ok   {label}:")), None)
        assert line is not None, f"no summary line for {label}:\n{out}"
        assert "objects valid against Kubernetes" in line and "(strict)" in line
    assert "all valid" in proc.stdout


def test_every_overlay_directory_is_covered():
    """A new overlay is validated (validate.sh globs overlays/*) and must be tested here too."""
    on_disk = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
    assert on_disk == sorted(OVERLAYS)


def _bad_overlay(tmp_path: Path, body: str) -> Path:
    """A temp overlay on a copy of base (so the real tree is never touched)."""
    shutil.copytree(K8S / "base", tmp_path / "base")
    overlay = tmp_path / "overlays" / "bad"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(body)
    return overlay


def test_validate_fails_on_an_invalid_object(tmp_path):
    overlay = _bad_overlay(
        tmp_path,
        "resources:\n  - ../../base\n"
        "patches:\n"
        "  - patch: |-\n"
        "      apiVersion: apps/v1\n"
        "      kind: Deployment\n"
        "      metadata:\n"
        "        name: mlflow\n"
        "      spec:\n"
        '        replicas: "two"\n',
    )
    proc = _run("bash", str(VALIDATE), str(overlay), K8S_VERSIONS=ONE_VERSION)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # kubernetes-validate's own error, naming the object and the field
    assert "did not validate for resource deployment/mlflow" in out, out
    assert "spec.replicas: 'two' is not of type 'integer'" in out, out
    assert f"FAIL {overlay}" in out and "INVALID" in out


def test_validate_fails_on_unknown_kind_and_on_secret_values(tmp_path):
    overlay = _bad_overlay(
        tmp_path,
        "resources:\n  - ../../base\n  - foo.yaml\n"
        "secretGenerator:\n"
        "  - name: leaked\n"
        "    literals: [password=hunter2]\n",
    )
    (overlay / "foo.yaml").write_text("apiVersion: example.com/v1\nkind: Foo\nmetadata: {name: x}\n")
    proc = _run("bash", str(VALIDATE), str(overlay), K8S_VERSIONS=ONE_VERSION)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "key 'password' holds a non-placeholder value" in out, out
    assert "hunter2" not in out  # the value itself is never printed

    (overlay / "kustomization.yaml").write_text("resources:\n  - ../../base\n  - foo.yaml\n")
    proc = _run("bash", str(VALIDATE), str(overlay), K8S_VERSIONS=ONE_VERSION)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Couldn't find schema for kind Foo" in out, out


# --- workload hygiene ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_container_has_requests_and_limits(rendered, name):
    containers = list(_containers(rendered[name]))
    assert containers
    for obj, _, c, _ in containers:
        res = c.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(section, {})), f"{_where(obj, c)}: {section} {res}"


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_long_running_containers_have_probes(rendered, name):
    for obj, _, c, is_init in _containers(rendered[name]):
        if obj["kind"] in LONG_RUNNING_KINDS and not is_init:
            assert "readinessProbe" in c and "livenessProbe" in c, _where(obj, c)


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_security_contexts_are_hardened(rendered, name):
    for obj, spec, c, _ in _containers(rendered[name]):
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        where = _where(obj, c)
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("capabilities", {}).get("add") is None, where
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", where
        assert not sc.get("privileged"), where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        # read-only root: every writable path is a declared volume
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: mount {m['name']} has no volume"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_put_everything_in_the_tlops_namespace(rendered, name):
    cluster_scoped = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding", "StorageClass"}
    for d in rendered[name]:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
    binding = _one(rendered[name], "RoleBinding", "tlops-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tlops-pipeline", "namespace": NAMESPACE}]


def test_base_is_namespace_agnostic(rendered):
    assert all("namespace" not in d["metadata"] for d in rendered["base"])
    assert "namespace" not in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())


# --- MLflow + Postgres --------------------------------------------------------------------------


def _mlflow_container(docs: list[dict]) -> tuple[dict, dict]:
    dep = _one(docs, "Deployment", "mlflow")
    spec = dep["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "mlflow"]
    return spec, c


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_mlflow_server_serves_artifacts_from_s3_with_a_postgres_backend(rendered, name):
    spec, c = _mlflow_container(rendered[name])
    assert c["image"] == "tlops:0.1.0"
    cmd = c.get("command", []) + c["args"]
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--app-name") + 1] == "tlops-auth"  # authentication + per-model permissions
    assert "--serve-artifacts" in cmd
    dest = cmd[cmd.index("--artifacts-destination") + 1]
    assert dest == "s3://$(MLFLOW_BUCKET)/mlflow"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5000"

    env = _env(c)
    # the backend store: Postgres, credentials only by reference (never literal, never in args)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql://$(DB_USER):$(DB_PASSWORD)@mlflow-postgres:5432/mlflow"
    )
    assert not any("postgresql://" in a for a in cmd)
    names = list(env)
    assert names.index("DB_USER") < names.index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) needs order
    assert names.index("DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    secret_refs = {
        k: v["valueFrom"]["secretKeyRef"] for k, v in env.items() if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert secret_refs == {
        "DB_USER": {"name": "tlops-mlflow-db", "key": "username"},
        "DB_PASSWORD": {"name": "tlops-mlflow-db", "key": "password"},
        # MLflow's own S3 user (artifact bucket), not the pipeline's
        "AWS_ACCESS_KEY_ID": {"name": "tlops-mlflow-s3", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "tlops-mlflow-s3", "key": "AWS_SECRET_ACCESS_KEY"},
        "MLFLOW_AUTH_ADMIN_USERNAME": {"name": "tlops-mlflow-auth", "key": "admin-username"},
        "MLFLOW_AUTH_ADMIN_PASSWORD": {"name": "tlops-mlflow-auth", "key": "admin-password"},
        "MLFLOW_FLASK_SERVER_SECRET_KEY": {"name": "tlops-mlflow-auth", "key": "flask-secret-key"},
    }
    # the auth store: the same database, by reference (defined after the URI it expands)
    assert env["TLOPS_AUTH_DATABASE_URI"]["value"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert names.index("MLFLOW_BACKEND_STORE_URI") < names.index("TLOPS_AUTH_DATABASE_URI")
    for var in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BUCKET"):
        assert env[var]["valueFrom"]["configMapKeyRef"] == {"name": "tlops-settings", "key": var}

    # read-only root: HOME on the /tmp emptyDir
    assert env["HOME"]["value"] == "/tmp"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in vols[mounts["/tmp"]]
    # the in-cluster Service name must pass MLflow 3's Host-header check
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert {"mlflow", "mlflow:5000"} <= set(allowed) and "*" not in allowed

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and ports[get["port"]] == 5000, probe

    svc = _one(rendered[name], "Service", "mlflow")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(5000, "http")]


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_postgres_statefulset(rendered, name):
    docs = rendered[name]
    sts = _one(docs, "StatefulSet", "mlflow-postgres")
    svc = _one(docs, "Service", "mlflow-postgres")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "mlflow-postgres"
    assert sts["spec"]["replicas"] == 1
    (vct,) = sts["spec"]["volumeClaimTemplates"]
    assert vct["spec"]["resources"]["requests"]["storage"] == "10Gi"
    spec = sts["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 70 and spec["securityContext"]["fsGroup"] == 70
    (c,) = spec["containers"]
    assert c["image"] == "postgres:16-alpine"
    env = _env(c)
    assert env["POSTGRES_USER"]["valueFrom"]["secretKeyRef"] == {"name": "tlops-mlflow-db", "key": "username"}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "tlops-mlflow-db", "key": "password"}
    assert env["POSTGRES_DB"]["value"] == "mlflow"
    data_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == vct["metadata"]["name"])
    assert env["PGDATA"]["value"].startswith(data_mount + "/")  # a subdir, not the volume root
    assert "/var/run/postgresql" in {m["mountPath"] for m in c["volumeMounts"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert "pg_isready" in " ".join(c[probe]["exec"]["command"])


# --- settings, secrets, RBAC --------------------------------------------------------------------


def test_settings_configmap(rendered):
    base = _one(rendered["base"], "ConfigMap", "tlops-settings")["data"]
    dev = _one(rendered["dev"], "ConfigMap", "tlops-settings")["data"]
    for data in (base, dev):
        assert data["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert data["MLFLOW_BUCKET"] and data["DATA_BUCKET"]
        assert data["MLFLOW_S3_ENDPOINT_URL"].startswith(("http://", "https://"))  # boto3 rejects ""
    assert dev["MLFLOW_S3_ENDPOINT_URL"] == dev["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert base["MLFLOW_S3_ENDPOINT_URL"].endswith("amazonaws.com")


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_no_secret_is_rendered_and_every_reference_is_documented(rendered, name):
    docs = rendered[name]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == []

    template = [d for d in yaml.safe_load_all((K8S / "base" / "secrets.example.yaml").read_text()) if d]
    documented = {(s["metadata"]["name"], k) for s in template for k in s.get("stringData", {})}
    settings = _one(docs, "ConfigMap", "tlops-settings")["data"]
    for obj, _, c, _ in _containers(docs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                assert key in documented, f"{_where(obj, c)}: {key} not in secrets.example.yaml"
            if "configMapKeyRef" in ref and ref["configMapKeyRef"]["name"] == "tlops-settings":
                assert ref["configMapKeyRef"]["key"] in settings, _where(obj, c)


def test_secret_template_holds_placeholders_only_and_is_not_applied():
    template = [d for d in yaml.safe_load_all((K8S / "base" / "secrets.example.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in template} == {
        "tlops-s3",
        "tlops-mlflow-s3",
        "tlops-mlflow-db",
        "tlops-mlflow-auth",
        "tlops-minio-root",
    }
    for d in template:
        assert d["kind"] == "Secret" and "data" not in d
        assert set(d["stringData"].values()) == {"CHANGE_ME"}
    for kustomization in K8S.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not any("secrets.example" in r for r in resources), kustomization
    readme = (K8S / "README.md").read_text()
    assert "kubectl -n tlops create secret generic tlops-s3" in readme
    assert "--from-literal=AWS_ACCESS_KEY_ID=" in readme and "--from-literal=AWS_SECRET_ACCESS_KEY=" in readme
    assert "create secret generic tlops-mlflow-db" in readme
    assert "--from-literal=username=" in readme and "--from-literal=password=" in readme


def test_pipeline_rbac_is_least_privilege(rendered):
    docs = rendered["dev"]
    _one(docs, "ServiceAccount", "tlops-pipeline")
    role = _one(docs, "Role", "tlops-pipeline")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    grants = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
        for res in rule["resources"]:
            grants[res] = (set(rule["verbs"]), rule.get("resourceNames"))
    # delete: only the multi-node fine-tune jobs the task itself submits (tlops.kfp.trainjob, on cancel)
    assert {r for r, (verbs, _) in grants.items() if "delete" in verbs} <= {"trainjobs", "pytorchjobs"}
    # pods: list (node 0 of that job) and its log only; no events; secrets/configmaps read by name only
    # (each grant's caller: tests/test_security_k8s.py)
    assert grants.get("pods", ({"list"}, None)) == ({"list"}, None)
    assert grants.get("pods/log", ({"get"}, None)) == ({"get"}, None)
    assert "events" not in grants
    assert grants["workflowtaskresults"] == ({"create", "patch"}, None)
    assert grants["configmaps"] == ({"get"}, ["kfp-launcher"])
    assert grants["secrets"] == ({"get"}, ["mlpipeline-minio-artifact"])
    binding = _one(docs, "RoleBinding", "tlops-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tlops-pipeline"}


# --- dev overlay: MinIO ---------------------------------------------------------------------------


def test_dev_minio_and_bucket_job(rendered):
    docs = rendered["dev"]
    ns = _one(docs, "Namespace", NAMESPACE)
    for mode in ("enforce", "warn", "audit"):
        assert ns["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted", mode

    svc = _one(docs, "Service", "minio")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [9000, 9001]
    minio = _one(docs, "Deployment", "minio")
    spec = minio["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = _env(c)
    root = {"name": "tlops-minio-root", "key": "MINIO_ROOT_USER"}
    assert env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"] == root
    assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {**root, "key": "MINIO_ROOT_PASSWORD"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v)
    _one(docs, "PersistentVolumeClaim", claim)
    assert minio["spec"]["strategy"]["type"] == "Recreate"  # RWO volume

    job = _one(docs, "Job", "minio-create-buckets")
    (mc,) = job["spec"]["template"]["spec"]["containers"]
    assert mc["image"].startswith("quay.io/minio/mc:")
    script = " ".join(mc.get("command", []) + mc.get("args", []))
    assert 'mc alias set tlops http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"' in script
    assert 'mc mb --ignore-existing "tlops/$MLFLOW_BUCKET" "tlops/$DATA_BUCKET"' in script
    env = _env(mc)
    for var in ("MLFLOW_BUCKET", "DATA_BUCKET"):
        assert env[var]["valueFrom"]["configMapKeyRef"] == {"name": "tlops-settings", "key": var}
    assert not any(o["kind"] == "Deployment" and o["metadata"]["name"] == "minio" for o in rendered["gpu"])


# --- gpu overlay: the node-pool contract must match GpuConfig -----------------------------------


def test_gpu_overlay_matches_gpuconfig_defaults(rendered):
    from tlops.config import GpuConfig

    gpu = GpuConfig()
    docs = rendered["gpu"]
    pool = _one(docs, "ConfigMap", "tlops-gpu-pool")["data"]
    assert json.loads(pool["node-selector.json"]) == gpu.node_selector
    assert json.loads(pool["tolerations.json"]) == [t.model_dump(exclude_none=True) for t in gpu.tolerations]
    assert pool["accelerator-resource"] == gpu.accelerator_type

    quota = _one(docs, "ResourceQuota", "tlops-gpu")
    assert f"requests.{gpu.accelerator_type}" in quota["spec"]["hard"]

    # and the docs say the same: label, taint key and effect, resource name
    ((label_key, label_value),) = gpu.node_selector.items()
    (tol,) = gpu.tolerations
    for doc in (K8S / "README.md", K8S / "overlays" / "gpu" / "kustomization.yaml"):
        text = doc.read_text()
        assert f"{label_key}={label_value}" in text or f"{label_key}: {label_value}" in text, doc
        assert tol.key in text and tol.effect in text and gpu.accelerator_type in text, doc
    readme = (K8S / "README.md").read_text()
    assert f"kubectl label node <gpu-node> {label_key}={label_value}" in readme
    assert f"kubectl taint node <gpu-node> {tol.key}=present:{tol.effect}" in readme


def test_images_are_pinned(rendered):
    for name in ("base", *OVERLAYS):
        for obj, _, c, _ in _containers(rendered[name]):
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), _where(obj, c)
