"""Kubeflow Pipelines: compiled IR structure from the one DAG, Kubernetes settings, kfp.local run."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from tests.conftest import REPO, digits_config
from tlops.config import load_config, validate_config
from tlops.dag import DAG, STEP_NAMES
from tlops.errors import TlopsError

GPU = {
    "gpu": {
        "accelerator_type": "nvidia.com/gpu",
        "accelerator_limit": 2,
        "node_selector": {"pool": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "shm_size": "16Gi",
    },
    "secrets": [
        {
            "name": "tlops-s3",
            "env": {"AWS_ACCESS_KEY_ID": "access-key-id", "AWS_SECRET_ACCESS_KEY": "secret-access-key"},
        },
        {"name": "tlops-mlflow", "env": {"MLFLOW_TRACKING_PASSWORD": "password"}},
    ],
    "data_version": "dvc-md5-abc123",
}


def _compile(tmp_path, monkeypatch, **sections):
    from tlops.kfp.pipeline import compile_pipeline

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    cfg = validate_config(digits_config(tmp_path / "w", **sections))
    out = compile_pipeline(cfg, tmp_path / "p.yaml")
    docs = list(yaml.safe_load_all(out.read_text()))
    return cfg, out.read_text(), docs[0], (docs[1] if len(docs) > 1 else {})


def test_compiled_dag_matches_the_library_dag(tmp_path, monkeypatch):
    _, _, spec, _ = _compile(tmp_path, monkeypatch)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEP_NAMES)
    for step in DAG:
        deps = set(tasks[step.name].get("dependentTasks", []))
        assert deps == set(step.inputs.values()), step.name
        arts = tasks[step.name]["inputs"].get("artifacts", {})
        assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in arts.items()} == step.inputs
    assert spec["pipelineInfo"]["name"] == "tlops-t-digits"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"config", "data_uri", "source_model", "model_name"}
    # the in-process runner walks the same DAG
    from tlops.runners import local

    assert local.DAG is DAG


def test_components_are_generated_from_the_dag():
    """Each component's interface is its StepSpec's: inputs typed by their producer's artifact kind,
    the output under the name consumers use, the pipeline parameters; the repo shells are the same."""
    import importlib.util

    from tlops.kfp.components import EXTRA_OUTPUTS, KFP_TYPES, PIPELINE_PARAMS, component

    producers = {s.name: s for s in DAG}
    for spec in DAG:
        cs = component(spec.name, "img:1").component_spec
        expected_in = {p: "String" for p in (*PIPELINE_PARAMS, "image")}
        expected_in |= {n: f"system.{KFP_TYPES[producers[p].output]}@0.0.1" for n, p in spec.inputs.items()}
        assert {n: i.type for n, i in cs.inputs.items()} == expected_in, spec.name
        expected_out = {spec.output_name: f"system.{KFP_TYPES[spec.output]}@0.0.1"}
        expected_out |= {n: f"system.{c}@0.0.1" for n, c in EXTRA_OUTPUTS.get(spec.name, ())}
        assert {n: o.type for n, o in cs.outputs.items()} == expected_out, spec.name
        assert cs.implementation.container.image == "img:1"

        path = REPO / "components" / spec.name.replace("-", "_") / "component.py"
        mod_spec = importlib.util.spec_from_file_location(f"shell_{spec.name}", path)
        shell = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(shell)
        assert shell.make("img:1").component_spec == cs, spec.name


def test_gpu_pool_secrets_retries_and_cache_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sup3r-s3cret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-pa55word")
    cfg, text, spec, platform = _compile(tmp_path, monkeypatch, kubernetes=GPU)
    execs = spec["deploymentSpec"]["executors"]
    ft = execs["exec-fine-tune"]["container"]
    assert ft["image"] == "tlops:0.1.0"
    acc = ft["resources"]["accelerator"]
    assert (acc["resourceCount"], acc["resourceType"]) == ("2", "nvidia.com/gpu")
    res = ft["resources"]
    assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == ("4", "16Gi")
    assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("8", "32Gi")
    ing = execs["exec-ingest"]["container"]["resources"]
    assert (
        ing["resourceCpuRequest"],
        ing["resourceMemoryRequest"],
        ing["resourceCpuLimit"],
        ing["resourceMemoryLimit"],
    ) == ("1", "2Gi", "2", "8Gi")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-fine-tune"]["nodeSelector"] == {"labels": {"pool": "a100"}}
    assert k8s["exec-fine-tune"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert k8s["exec-fine-tune"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
    ]
    for name in ("exec-ingest", "exec-evaluate", "exec-register"):
        assert "nodeSelector" not in k8s[name] and "accelerator" not in execs[name]["container"].get("resources", {})
        envs = {e["envVar"] for s in k8s[name]["secretAsEnv"] for e in s["keyToEnv"]}
        assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("pull-model", "register"):
        assert tasks[name]["retryPolicy"] == {
            "backoffDuration": "30s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "600s",
            "maxRetryCount": 3,
        }
    assert "retryPolicy" not in tasks["fine-tune"]
    key = f"tlops-fine-tune-{cfg.config_hash[:16]}-dvc-md5-abc123"
    assert tasks["fine-tune"]["cachingOptions"] == {"cacheKey": key, "enableCache": True}
    assert tasks["ingest"]["cachingOptions"]["enableCache"] is True  # data version pinned
    assert tasks["register"]["cachingOptions"].get("enableCache", False) is False
    for secret in ("sup3r-s3cret-value", "mlflow-pa55word"):
        assert secret not in text


DIGEST = "sha256:" + "ab12" * 16


def test_image_pinned_by_digest_joins_the_kfp_cache_key(tmp_path, monkeypatch, caplog):
    image = f"registry.example.com/ml/tlops@{DIGEST}"
    with caplog.at_level(logging.WARNING, logger="tlops.kfp.pipeline"):
        cfg, _, spec, _ = _compile(tmp_path, monkeypatch, kubernetes={"image": image, "data_version": "v7"})
    assert not caplog.records  # pinned: nothing to warn about
    tasks = spec["root"]["dag"]["tasks"]
    key = f"tlops-fine-tune-{cfg.config_hash[:16]}-v7-{DIGEST}"
    assert tasks["fine-tune"]["cachingOptions"] == {"cacheKey": key, "enableCache": True}
    assert tasks["ingest"]["cachingOptions"]["cacheKey"].endswith(f"-v7-{DIGEST}")
    for name in STEP_NAMES:  # each task knows its image: its digest joins the step key inside the task
        assert tasks[name]["inputs"]["parameters"]["image"] == {"runtimeValue": {"constant": image}}

    # the image may come from TLOPS_IMAGE instead of the config: its digest counts the same
    from tlops.kfp.pipeline import compile_pipeline

    monkeypatch.setenv("TLOPS_IMAGE", f"tlops@{DIGEST}")
    plain = validate_config(digits_config(tmp_path / "w"))
    ir = next(yaml.safe_load_all(compile_pipeline(plain, tmp_path / "env.yaml").read_text()))
    assert ir["root"]["dag"]["tasks"]["fine-tune"]["cachingOptions"]["cacheKey"].endswith(f"-unpinned-{DIGEST}")

    with pytest.raises(TlopsError, match="sha256:<64 hex digits>"):
        _compile(tmp_path, monkeypatch, kubernetes={"image": "tlops@sha256:abc"})


def test_image_tag_with_caching_warns_once_how_to_pin(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="tlops.kfp.pipeline"):
        cfg, _, spec, _ = _compile(tmp_path, monkeypatch, kubernetes={"image": "registry:5000/tlops:0.1.0"})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "registry:5000/tlops:0.1.0 is a tag" in warnings[0]
    assert "kubernetes.image: registry:5000/tlops@sha256:<digest>" in warnings[0]
    # the key stays what it was: config hash and data version
    key = spec["root"]["dag"]["tasks"]["fine-tune"]["cachingOptions"]["cacheKey"]
    assert key == f"tlops-fine-tune-{cfg.config_hash[:16]}-unpinned"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tlops.kfp.pipeline"):
        _compile(tmp_path, monkeypatch, kubernetes={"image": "tlops:0.1.0", "caching": False})
    assert not caplog.records  # nothing cached, nothing stale


def test_task_step_key_includes_the_image_digest(tmp_path):
    """Inside a KFP task, the step key (recorded in the manifest, used for reuse) has the digest."""
    from types import SimpleNamespace

    from tlops import dag
    from tlops.artifacts import read_artifact
    from tlops.contract import step_key
    from tlops.kfp.task import config_from_params, run_task

    config = json.dumps(validate_config(digits_config(tmp_path / "w")).to_dict())
    cfg = config_from_params(config, {})
    spec = dag.get("ingest")
    keys = {}
    for i, image in enumerate(["tlops:0.1.0", f"tlops@{DIGEST}", "tlops@sha256:" + "cd34" * 16]):
        out = SimpleNamespace(path=str(tmp_path / f"out{i}"), metadata={})
        args = {"config": config, "data_uri": "", "source_model": "", "model_name": "", "image": image}
        run_task("ingest", {**args, "dataset": out})
        keys[image] = read_artifact(tmp_path / f"out{i}").manifest["step_key"]
        assert out.metadata["image"] == image
    assert keys["tlops:0.1.0"] == step_key(spec, cfg, {})  # a tag: the same key as every other runner
    assert keys[f"tlops@{DIGEST}"] == step_key(spec, cfg, {}, DIGEST)
    assert len(set(keys.values())) == 3
    import gc

    assert gc.get_freeze_count() == 0  # only a KFP executor process, which exits next, freezes its objects


def test_cpu_only_when_no_gpu_configured(tmp_path, monkeypatch):
    _, text, spec, platform = _compile(tmp_path, monkeypatch)
    ft = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]
    assert "accelerator" not in ft.get("resources", {})
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    # no selector, toleration or /dev/shm mount: only what every task gets (pod label, security context)
    assert set(executors["exec-fine-tune"]) == {"podMetadata", "securityContext"}
    assert "/dev/shm" not in text and "nvidia" not in text
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["ingest"]["cachingOptions"].get("enableCache", False) is False  # data version unpinned


def test_committed_compiled_pipeline_is_fresh(tmp_path, monkeypatch):
    from tlops.kfp.pipeline import compile_pipeline

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    committed = REPO / "pipelines" / "transfer_learning" / "digits-target.yaml"
    cfg = load_config(REPO / "configs" / "digits_target.yaml")
    fresh = compile_pipeline(cfg, tmp_path / "fresh.yaml").read_text()
    assert committed.read_text() == fresh, "run: make compile (pipelines/transfer_learning/digits-target.yaml is stale)"


def test_kfp_local_matches_in_process_runner(tmp_path):
    """Digits demo: source in-process, target through kfp.local, target again in-process: same model."""
    from tlops.kfp.pipeline import run_kfp_local
    from tlops.runners.local import run_pipeline

    work = [f"workdir={tmp_path / 'w'}", "train.epochs=4"]
    run_pipeline(load_config(REPO / "configs" / "digits_source.yaml", [*work, "train.epochs=3"]))
    target = load_config(REPO / "configs" / "digits_target.yaml", work)
    kfp = run_kfp_local(target)
    assert kfp.run_dir.parent == tmp_path / "w" / "kfp-local"
    from tlops.kfp.pipeline import PROCESS_PREFIX
    from tlops.kfp.task import TIMING_PREFIX

    for spec in DAG:  # each step's seconds are its task process's, whose start and exit end its log
        lines = (kfp.run_dir / spec.name / "task.log").read_text().splitlines()
        proc = json.loads(lines[-1].removeprefix(PROCESS_PREFIX))
        task = json.loads(next(ln for ln in lines if ln.startswith(TIMING_PREFIX)).removeprefix(TIMING_PREFIX))
        assert proc["rc"] == 0 and proc["forked"] and task["step"] == spec.name and task["step_seconds"] > 0
        assert proc["started"] < task["entered"] < task["left"] < proc["exited"]
        assert kfp.steps[spec.name].seconds == pytest.approx(proc["exited"] - proc["started"], abs=0.5)
    reg = kfp.artifact("register").meta
    assert reg["aliases"] == ["challenger"] and reg["version"] == "1" and not reg["reused"]

    import mlflow

    from tlops.tracking.setup import use_store

    use_store(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    mv = mlflow.MlflowClient().get_model_version_by_alias("digits-target", "challenger")
    assert str(mv.version) == "1"
    run = mlflow.MlflowClient().get_run(reg["run_id"])
    assert run.data.tags["tlops.data_hash"] == kfp.artifact("ingest").meta["data_hash"]  # lineage logged by register

    local = run_pipeline(target, reuse=False)
    a = json.loads((kfp.artifact("evaluate").path / "report.json").read_text())
    b = json.loads((local.artifact("evaluate").path / "report.json").read_text())
    assert a["selected"] == b["selected"]
    for name in a["models"]:
        assert a["models"][name]["accuracy"] == pytest.approx(b["models"][name]["accuracy"], abs=1e-6)
    # same seed, same model: the in-process run finds the kfp-local registration and reuses it
    assert local.artifact("register").meta["version"] == "1" and local.artifact("register").meta["reused"] is True
    assert local.artifact("extract-features").meta["cache"] == "hit"
