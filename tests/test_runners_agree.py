"""Every runner file comes from the one DAG: compose services, DVC stages and KFP tasks list the
same steps, in the same (topological) order, with the same edges; the compose file is fresh."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import REPO
from typer.testing import CliRunner

from tlops.dag import DAG, STEP_NAMES
from tlops.runners import compose

EDGES = {s.name: set(s.inputs.values()) for s in DAG}


def _topological(order: list[str], edges: dict[str, set[str]]) -> bool:
    seen: set[str] = set()
    for name in order:
        if not edges[name] <= seen:
            return False
        seen.add(name)
    return True


def test_compose_services_dvc_stages_and_kfp_tasks_match_the_dag():
    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    infra = ("mlflow", "mlflow-users", "promote", "summary", "serve")  # not steps: server, its users, reviewer, ...
    steps = [n for n in services if n not in infra]
    assert steps == list(STEP_NAMES)
    compose_edges = {n: {d for d, c in services[n]["depends_on"].items() if d not in infra} for n in steps}
    assert compose_edges == EDGES
    for n in steps:
        assert services[n]["depends_on"]["mlflow"] == {"condition": "service_healthy"}
        assert all(
            c == {"condition": "service_completed_successfully"}
            for d, c in services[n]["depends_on"].items()
            if d != "mlflow"
        )
        assert services[n]["command"][:2] == ["step", n]

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STEP_NAMES)
    dvc_edges = {
        n: {d.split("/")[-1] for d in st.get("deps", []) if d.startswith("dvc-artifacts/")} for n, st in stages.items()
    }
    assert dvc_edges == EDGES

    ir = next(yaml.safe_load_all((REPO / "pipelines" / "transfer_learning" / "digits-target.yaml").read_text()))
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEP_NAMES)
    kfp_edges = {n: set(t.get("dependentTasks", [])) for n, t in tasks.items()}
    assert kfp_edges == EDGES
    assert _topological(list(STEP_NAMES), kfp_edges)


def test_committed_compose_file_is_fresh():
    committed = (REPO / "docker" / "compose.yaml").read_text()
    assert committed == compose.render(), (
        "docker/compose.yaml is stale: run `tlops export compose` (make compose-export)"
    )


def test_compose_step_commands_wire_inputs_to_producers():
    services = compose.services()
    runs = compose.RUNS
    fine_tune = services["fine-tune"]["command"]
    assert fine_tune[fine_tune.index("--out") + 1] == f"{runs}/fine-tune"
    ins = [fine_tune[i + 1] for i, a in enumerate(fine_tune) if a == "--in"]
    assert ins == [f"dataset={runs}/ingest", f"model={runs}/pull-model", f"features={runs}/extract-features"]
    assert services["register"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["promote"]["depends_on"] == {"register": {"condition": "service_completed_successfully"}}
    assert services["summary"]["depends_on"] == {"promote": {"condition": "service_completed_successfully"}}
    # MLflow 3 rejects unknown Host headers (403): the steps reach it as mlflow:5000
    assert "mlflow:*" in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert services["mlflow"]["ports"] == ["127.0.0.1:${TLOPS_MLFLOW_PORT:-5000}:5000"]
    host = compose.services(host_network=True)
    assert all(s["network_mode"] == "host" for s in host.values())
    assert host["evaluate"]["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "ports" not in host["mlflow"]


def test_summary_command_prints_a_finished_run(digits_cfg, tmp_path):
    from tlops.cli import app
    from tlops.config import save_config
    from tlops.runners.local import run_pipeline

    cfg = digits_cfg()
    res = run_pipeline(cfg)
    save_config(cfg, tmp_path / "c.yaml")
    out = CliRunner().invoke(app, ["summary", "-c", str(tmp_path / "c.yaml"), "--run-dir", str(res.run_dir)])
    assert out.exit_code == 0, out.output
    assert "linear-probe *" in out.output
    assert "registered t-digits v1 as challenger" in out.output
    missing = CliRunner().invoke(app, ["summary", "-c", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "nope")])
    assert missing.exit_code != 0
    assert f"{tmp_path / 'nope'} has no finished ingest artifact: did the ingest step run?" == str(missing.exception)
    assert Path(res.run_dir).is_dir()
