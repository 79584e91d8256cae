"""The ``monitor-and-adapt`` KFP pipeline: compiled IR (monitor, then on a shift the transfer
pipeline on the adaptation config and the description task; nothing cached, no runtime pip
install, hardened pods) and, slow, a real ``kfp.local`` run that adapts the registered digits
model to rotated digits (``reg`` of test_monitor)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import digits_config
from tests.test_monitor import reg  # noqa: F401 - the fixture: a registered t-digits model and rotated digits
from tlops.config import validate_config


def test_compiled_monitor_and_adapt_runs_the_dag_only_on_a_shift(tmp_path, monkeypatch):
    from tlops.dag import STEP_NAMES
    from tlops.kfp.monitor_adapt import compile_monitor_adapt
    from tlops.kfp.pipeline import RUN_AS

    monkeypatch.delenv("TLOPS_IMAGE", raising=False)
    cfg = validate_config(digits_config(tmp_path / "w", kubernetes={"caching": True}))
    spec, platform = yaml.safe_load_all((compile_monitor_adapt(cfg, tmp_path / "ma.yaml")).read_text())
    assert spec["pipelineInfo"]["name"] == "tlops-t-digits-monitor-and-adapt"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config", "model", "data_uri", "data_format", "strategies", "overrides"}
    assert params["model"]["defaultValue"] == "t-digits@champion" and not params["data_uri"].get("isOptional")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"monitor", "condition-1"}
    cond = tasks["condition-1"]
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--monitor-Output'] != 'ok'"
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"adapt-config", "tlops-t-digits", "describe-adaptation"}
    assert sorted(inner["describe-adaptation"]["dependentTasks"]) == ["adapt-config", "tlops-t-digits"]
    # the transfer pipeline gets the monitor's adaptation config as its config parameter
    sub = inner["tlops-t-digits"]["inputs"]["parameters"]["config"]["taskOutputParameter"]
    assert sub == {"outputParameterKey": "Output", "producerTask": "adapt-config"}
    assert set(spec["components"]["comp-tlops-t-digits"]["dag"]["tasks"]) == set(STEP_NAMES)
    # nothing cached (the config arrives at run time: compile-time cache keys would be wrong)
    assert "enableCache: true" not in (tmp_path / "ma.yaml").read_text()
    assert "cacheKey" not in (tmp_path / "ma.yaml").read_text()
    executors = spec["deploymentSpec"]["executors"]
    assert {"exec-monitor", "exec-adapt-config", "exec-describe-adaptation", "exec-fine-tune"} <= set(executors)
    for name, ex in executors.items():
        assert "pip install" not in " ".join(ex["container"]["command"]), name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in executors:
        sc = k8s[name]["securityContext"]
        assert sc["runAsNonRoot"] is True and int(sc["runAsUser"]) == RUN_AS, name


def test_empty_data_uri_is_a_clear_error(tmp_path):
    from types import SimpleNamespace

    from tlops.errors import ConfigError
    from tlops.kfp.monitor_adapt import run_monitor

    cfg = validate_config(digits_config(tmp_path / "w"))
    args = {"config": json.dumps(cfg.to_dict()), "data_uri": "", "report": SimpleNamespace(path=str(tmp_path))}
    with pytest.raises(ConfigError, match=r"^monitor-and-adapt: pipeline parameter data_uri is empty"):
        run_monitor(args)


@pytest.mark.slow
def test_kfp_local_monitor_and_adapt_registers_the_adapted_model(reg, monkeypatch):  # noqa: F811 - the fixture
    from tlops.kfp.monitor_adapt import run_kfp_local
    from tlops.tracking import registry
    from tlops.tracking.setup import use_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = validate_config(digits_config(reg.work))
    run_kfp_local(
        cfg,
        data_uri=str(reg.shifted),
        model="t-digits@challenger",
        strategies="source-only,adabn",
        overrides=json.dumps(["train.adapt.epochs=1"]),
    )
    use_store(reg.uri)
    versions = {int(v.version): v for v in registry.client().search_model_versions("name='t-digits'")}
    adapted = versions[max(versions)]
    assert max(versions) >= 2 and "## Adaptation (tlops adapt)" in adapted.description
    assert adapted.tags["tlops.strategy"] in ("source-only", "adabn")
    assert "| before (monitored model) | v1 | shift |" in adapted.description
