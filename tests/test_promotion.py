"""Promotion in the registry: gates refuse bad versions, champion history, rollback, compare, safe registration.

Against a real sqlite-backed MLflow registry: one tiny digits pipeline registers v1 (gates pass,
promoted to champion), a second run registers v2 (a stricter gate fails; its report compares it with
champion v1). Promotion/rollback flows use extra versions created on the same store.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import digits_config

STAMP = r"tester \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking import registry
    from tlops.tracking.setup import embedded_uri, use_store

    work = tmp_path_factory.mktemp("promotion") / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.setenv("TLOPS_USER", "tester")
        first = run_pipeline(validate_config(digits_config(work)))
        use_store(embedded_uri(work))
        registry.promote("t-digits", "1", reason="baseline")
        strict = digits_config(work, train={"probe_c": [0.01]}, evaluate={"gates": {"min_accuracy": 0.999}})
        second = run_pipeline(validate_config(strict))
    assert first.artifact("register").meta["version"] == "1" and second.artifact("register").meta["version"] == "2"
    return SimpleNamespace(work=work, uri=embedded_uri(work), first=first, second=second)


@pytest.fixture
def store(reg, monkeypatch):
    import mlflow

    from tlops.tracking.setup import use_store

    monkeypatch.setenv("TLOPS_USER", "tester")
    use_store(reg.uri)
    return mlflow.MlflowClient()


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``tlops ...`` in this process through the real entry point: (exit code, stdout, stderr)."""
    from tlops.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["tlops", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _versions(store, name: str, statuses: list[str | None]) -> None:
    """A registered model whose versions carry the given validation_status tags (None: no tag)."""
    src = store.get_model_version("t-digits", "1")
    store.create_registered_model(name)
    for s in statuses:
        store.create_model_version(name, src.source, run_id=src.run_id, tags={"validation_status": s} if s else None)


def test_description_has_metrics_champion_comparison_and_links(reg, store):
    v1, v2 = store.get_model_version("t-digits", "1"), store.get_model_version("t-digits", "2")
    report = json.loads((reg.second.artifact("evaluate").path / "report.json").read_text())
    acc, champ = report["metrics"]["accuracy"], report["champion"]
    assert champ["version"] == "1" and champ["comparable"] is True
    assert v2.tags["validation_status"] == f"failed: accuracy {acc:.4f} < 0.999"
    d = v2.description
    assert "| metric | this version (`linear-probe`) | champion v1 | change |" in d
    m = report["metrics"]

    def ci(name: str, x: dict, sign: str = "") -> str:  # value [low, high] as the description prints it
        lo, hi = x[f"{name}_ci"]
        return f"{x[name]:{sign}.4f} [{lo:{sign}.4f}, {hi:{sign}.4f}]"

    assert champ["gain"] == pytest.approx(acc - champ["accuracy"])
    assert f"| target accuracy | {ci('accuracy', m)} | {ci('accuracy', champ)} | {ci('gain', champ, '+')} |" in d
    assert f"| macro-F1 | {ci('macro_f1', m)} | {ci('macro_f1', champ)} |" in d
    assert f"| ECE (lower is better) | {report['metrics']['ece']:.4f} | {champ['ece']:.4f} |" in d
    assert "| gain over from-scratch | not measured | | |" in d
    delta = acc - champ["accuracy"]
    assert (
        f"Champion comparison: current `champion` v1 scores {champ['accuracy']:.4f} accuracy on the same test split "
        f"({report['test_size']} samples); this version scores {acc:.4f} ({delta:+.4f}, "
        f"{'better' if delta > 0 else 'worse' if delta < 0 else 'equal'})."
    ) in d
    assert d.splitlines()[0] == (
        f"t-digits · linear-probe · test accuracy {acc:.4f} (champion v1: {champ['accuracy']:.4f}) · validation failed"
    )
    assert f"Validation: **failed**: accuracy {acc:.4f} < 0.999" in d
    assert f"Data: `{report['data_hash'][:16]}`" in d and "Source model: `timm:resnet10t`" in d
    assert "| linear-probe (selected) |" in d  # the per-strategy table is still there
    exp = store.get_run(v2.run_id).info.experiment_id
    page = f"#/experiments/{exp}/runs/{v2.run_id}/artifacts/evaluation"
    assert f"[confusion matrix]({page}/confusion_matrix.png)" in d
    assert f"[evaluation report]({page}/report.md)" in d
    assert (
        "![confusion matrix of the selected model]"
        f"(get-artifact?path=evaluation%2Fconfusion_matrix.png&run_uuid={v2.run_id})" in d
    )
    logged = {a.path for a in store.list_artifacts(v2.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/report.md", "evaluation/report.json"} <= logged
    assert "Champion comparison: there is no `champion` yet." in v1.description
    assert "| metric | this version (`linear-probe`) |\n|---|---|" in v1.description


def test_promote_refuses_failed_gates_unless_forced(reg, store, cli):
    status = store.get_model_version("t-digits", "2").tags["validation_status"]
    code, out, err = cli("promote", "t-digits", "2", "--workdir", str(reg.work))
    assert (code, out) == (1, "")
    assert err == (
        f"error: refusing to promote t-digits v2: validation_status is '{status}', not 'passed'; "
        "fix the model or promote anyway with --force\n"
    )
    assert str(store.get_model_version_by_alias("t-digits", "champion").version) == "1"

    _versions(store, "t-force", ["passed", "failed: accuracy 0.5 < 0.9", None])
    assert cli("promote", "t-force", "1", "--workdir", str(reg.work))[:2] == (0, "t-force: champion -> v1\n")
    code, _, err = cli("promote", "t-force", "3", "--workdir", str(reg.work))
    assert code == 1 and err == (
        "error: refusing to promote t-force v3: validation_status is missing, not 'passed'; "
        "fix the model or promote anyway with --force\n"
    )
    code, out, _ = cli("promote", "t-force", "2", "--force", "--reason", "hotfix", "--workdir", str(reg.work))
    assert (code, out) == (0, "t-force: champion -> v2 (previous champion: v1) [forced: gates failed]\n")
    assert str(store.get_model_version_by_alias("t-force", "champion").version) == "2"
    assert str(store.get_model_version_by_alias("t-force", "previous-champion").version) == "1"
    tag = store.get_model_version("t-force", "2").tags["tlops.promoted"]
    assert re.fullmatch(STAMP + r" hotfix \[forced: validation_status failed: accuracy 0.5 < 0.9\]", tag), tag
    assert re.fullmatch(STAMP + r" \(no reason given\)", store.get_model_version("t-force", "1").tags["tlops.promoted"])
    assert cli("promote", "t-force", "2", "--workdir", str(reg.work))[1] == "t-force: v2 is already champion\n"


def test_rollback_swaps_champion_and_previous(reg, store, cli, tmp_path):
    _versions(store, "t-roll", ["passed", "passed"])
    code, out, err = cli("rollback", "t-roll", "--workdir", str(reg.work))
    assert (code, out) == (1, "")
    assert (
        err == "error: cannot roll back t-roll: it has no 'previous-champion' alias "
        "(nothing was promoted over another champion)\n"
    )
    cli("promote", "t-roll", "1", "--workdir", str(reg.work), "--reason", "first")
    assert (
        cli("promote", "t-roll", "2", "--workdir", str(reg.work))[1]
        == "t-roll: champion -> v2 (previous champion: v1)\n"
    )
    code, out, _ = cli("rollback", "t-roll", "--reason", "latency regression", "--workdir", str(reg.work))
    assert (code, out) == (0, "t-roll: rolled back, champion -> v1 (previous champion: v2)\n")
    aliases = {a: str(store.get_model_version_by_alias("t-roll", a).version) for a in ("champion", "previous-champion")}
    assert aliases == {"champion": "1", "previous-champion": "2"}
    assert re.fullmatch(
        STAMP + r" latency regression \(from v2\)", store.get_model_version("t-roll", "1").tags["tlops.rolled_back"]
    )
    # a second rollback undoes the first
    assert (
        cli("rollback", "t-roll", "--workdir", str(reg.work))[1]
        == "t-roll: rolled back, champion -> v2 (previous champion: v1)\n"
    )
    history = store.get_registered_model("t-roll").tags["tlops.history"].splitlines()
    assert [re.sub(STAMP, "WHO", h) for h in history] == [
        "promote v1 (previous champion: none) by WHO first",
        "promote v2 (previous champion: v1) by WHO (no reason given)",
        "rollback to v1 (from v2) by WHO latency regression",
        "rollback to v2 (from v1) by WHO (no reason given)",
    ]
    # no store there: say where it looked
    code, _, err = cli("rollback", "t-roll", "--workdir", str(tmp_path / "nowhere"))
    assert code == 1 and err == (
        f"error: no MLflow store at {tmp_path / 'nowhere' / 'mlflow.db'}: pass --workdir "
        "(the pipeline's workdir) or set MLFLOW_TRACKING_URI\n"
    )


def test_compare_prints_table_and_writes_html(reg, store, cli, tmp_path, monkeypatch):
    r1 = json.loads((reg.first.artifact("evaluate").path / "report.json").read_text())["metrics"]
    r2 = json.loads((reg.second.artifact("evaluate").path / "report.json").read_text())["metrics"]
    v2 = store.get_model_version("t-digits", "2")
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli("compare", "t-digits", "1", "2", "--workdir", str(reg.work))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "t-digits: v1 vs v2"
    assert lines[1].split() == ["v1", "v2", "change"]
    rows = {re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line)[1:] for line in lines[3:]}
    assert rows["test accuracy"] == [
        f"{r1['accuracy']:.4f}",
        f"{r2['accuracy']:.4f}",
        f"{r2['accuracy'] - r1['accuracy']:+.4f}",
    ]
    assert rows["macro-F1"][:2] == [f"{r1['macro_f1']:.4f}", f"{r2['macro_f1']:.4f}"]
    assert rows["ECE (lower is better)"][:2] == [f"{r1['ece']:.4f}", f"{r2['ece']:.4f}"]
    assert rows["gain over from-scratch"] == ["n/a", "n/a"]
    assert rows["strategy"] == ["linear-probe", "linear-probe", "same"]
    assert rows["source model"] == ["timm:resnet10t", "timm:resnet10t", "same"]
    assert rows["data hash"][2] == "same" and len(rows["data hash"][0]) == 16
    assert rows["validation status"] == ["passed", v2.tags["validation_status"], "differs"]
    # v2 failed its gates: registered for the record, challenger stays on v1 (also champion)
    assert rows["aliases"][:2] == ["challenger, champion", "-"]
    assert lines[-2] == "same data: metrics are on the same test split"
    assert lines[-1] == "wrote compare-t-digits-1-2.html"
    page = (tmp_path / "compare-t-digits-1-2.html").read_text()
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == 2  # both confusion matrices, inline PNG
    assert "<title>t-digits: v1 vs v2</title>" in page and "failed: accuracy" in page
    code, _, err = cli("compare", "t-digits", "1", "7", "--workdir", str(reg.work), "--out", str(tmp_path / "x.html"))
    assert code == 1 and err.startswith("error: cannot compare t-digits version 7: ")


RACER = r"""
import sys, time, pathlib
from tlops.tracking import registry

mine, other = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
check = registry.find_version_by_tag

def racing(*args, **kwargs):  # both processes pass the "already registered?" check before either registers
    found = check(*args, **kwargs)
    mine.touch()
    deadline = time.time() + 120
    while not other.exists() and time.time() < deadline:
        time.sleep(0.02)
    return found

registry.find_version_by_tag = racing
sys.argv = ["tlops", *sys.argv[3:]]
from tlops.cli import main
main()
"""


@pytest.mark.slow  # two real register processes (~70 s on 2 busy cores)
def test_concurrent_registration_creates_one_version(reg, tmp_path):
    """Two `tlops step register` processes on the same model at the same time: one version."""
    import mlflow

    from tlops.config import validate_config
    from tlops.tracking.setup import configure

    work = tmp_path / "work"
    raw = digits_config(work)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    configure(validate_config(raw))  # create the store + experiment first (as a tracking server would have)
    ins = [
        f"{k}={reg.first.artifact(step).path}"
        for k, step in (
            ("dataset", "ingest"),
            ("model", "pull-model"),
            ("trained", "fine-tune"),
            ("evaluation", "evaluate"),
        )
    ]
    procs = []
    for me, them in (("a", "b"), ("b", "a")):
        args = ["step", "register", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / me)]
        for i in ins:
            args += ["--in", i]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(tmp_path / f"{me}.ready"), str(tmp_path / f"{them}.ready"), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    t0 = time.time()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (tmp_path / "a.ready").exists() and (tmp_path / "b.ready").exists()
    recs = [json.loads((tmp_path / me / "registration.json").read_text()) for me in "ab"]
    assert [r["version"] for r in recs] == ["1", "1"]
    assert sorted(r["reused"] for r in recs) == [False, True]
    loser = outs[[r["reused"] for r in recs].index(True)][1]
    assert "(digest " in loser and "registered concurrently): deleted v2, reusing v1" in loser
    c = mlflow.MlflowClient(
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}", registry_uri=f"sqlite:///{work / 'mlflow.db'}"
    )
    assert [str(v.version) for v in c.search_model_versions("name = 't-digits'")] == ["1"]
    v1 = c.get_model_version("t-digits", "1")
    assert v1.aliases == ["challenger"] and v1.tags["validation_status"] == "passed"
    print(f"two concurrent registrations took {time.time() - t0:.1f}s")


def test_rerun_after_auto_promotion_reuses_evaluate_and_never_asks_a_model_to_beat_itself(tmp_path):
    """Run 1 registers v1 and makes it champion. Run 2 with unchanged inputs must not re-evaluate just
    because the champion is now that very model; a forced re-evaluation compares with it as 'this model'
    and the must_beat_champion gate passes (before: 'accuracy <= champion v1', validation_status failed)."""
    import mlflow

    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline
    from tlops.tracking.setup import use_store

    def cfg(**evaluate):
        return validate_config(
            digits_config(
                tmp_path / "work",
                register={"model_name": "t-self", "auto_promote": True},
                evaluate={"scratch_baseline": False, "gates": {"must_beat_champion": True}, **evaluate},
            )
        )

    first = run_pipeline(cfg())
    assert first.artifact("register").meta["version"] == "1"
    second = run_pipeline(cfg())
    assert second.steps["evaluate"].reused
    assert second.artifact("register").meta["version"] == "1" and second.artifact("register").meta["reused"] is True
    third = run_pipeline(cfg(ece_bins=10))  # a changed evaluate section: evaluated again, against champion v1 = itself
    assert not third.steps["evaluate"].reused
    report = json.loads((third.artifact("evaluate").path / "report.json").read_text())
    assert report["champion"]["same_model"] is True and report["champion"]["version"] == "1"
    assert report["gates"]["passed"] is True
    assert report["gates"]["checks"] == [
        {"gate": "must_beat_champion", "passed": True, "reason": "champion v1 is this model"}
    ]
    assert (
        "- champion: v1 is this model (same weights digest)"
        in (third.artifact("evaluate").path / "report.md").read_text()
    )
    use_store(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    mv = mlflow.MlflowClient().get_model_version("t-self", "1")
    assert mv.tags["validation_status"] == "passed"
    assert len(mlflow.MlflowClient().search_model_versions("name = 't-self'")) == 1
