"""register: log the selected model as an MLflow pyfunc, register a version, set aliases.

Every model is registered, with its ``validation_status`` tag (``passed`` or ``failed: <reasons>``),
so a failed one is on record; the ``challenger`` alias moves only to a version that passed its
gates (``champion`` moves by ``tlops promote``, or by ``register.auto_promote`` on a pass).

Idempotent: a model whose digest is already registered under the same name is not
registered again; the existing version is reused (and re-aliased). Two registrations racing
(two processes) settle on the lowest version after the fact (``registry.settle_duplicate``).

The version's description is what a reviewer reads on its MLflow page: metrics against the
current champion, gates, data and source lineage, and links to the evaluation artifacts.

A new version gets an integrity manifest (sha256 of every stored model file, its digest as the
tag ``tlops.manifest_sha256``): every tlops loader refuses files that differ from it
(:mod:`tlops.tracking.integrity`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.data.dataset import Dataset
from tlops.evaluation.report import metrics_table, with_ci
from tlops.tracking import integrity, registry
from tlops.tracking.setup import configure, git_commit, log_environment, pipeline_run
from tlops.tracking.steplog import data_tags, log_step

log = logging.getLogger(__name__)


def _dvc_line(version: dict[str, Any]) -> list[str]:
    if not version.get("git_rev"):
        return []
    return [
        f"DVC: `{version['dvc_path']}` md5 `{version['dvc_md5']}` at git rev `{version['git_rev']}` "
        f"of {version['dvc_repo']}"
    ]


def _source_used(source: Artifact, trained: Artifact) -> tuple[str, str]:
    """The source model the trained models came from (the selected one, with candidates)."""
    return trained.meta.get("source", source.meta["source"]), trained.meta.get(
        "source_digest", source.meta["model_digest"]
    )


def _champion_summary(report: dict[str, Any], version: str | None) -> tuple[list[str], str]:
    """The 'this version vs champion' table and a sentence on the comparison."""
    m, ch = report["metrics"], report.get("champion")
    comparable = bool(ch and ch.get("comparable"))
    this = f"this version (`{report['selected']}`)"
    if comparable and (str(ch["version"]) == str(version) or ch.get("same_model")):
        comparable, note = False, f"This version is the current champion (v{ch['version']})."
    elif comparable:
        delta = m["accuracy"] - ch["accuracy"]
        verdict = "better" if delta > 0 else "worse" if delta < 0 else "equal"
        note = (
            f"Champion comparison: current `champion` v{ch['version']} scores {ch['accuracy']:.4f} accuracy on the "
            f"same test split ({report['test_size']} samples); this version scores {m['accuracy']:.4f} "
            f"({delta:+.4f}, {verdict})."
        )
    elif ch:
        note = f"Champion comparison: champion v{ch['version']} is not comparable ({ch.get('reason')})."
    else:
        note = "Champion comparison: there is no `champion` yet."
    head = [
        f"| metric | {this} | champion v{ch['version']} | change |" if comparable else f"| metric | {this} |",
        "|---|---|---|---|" if comparable else "|---|---|",
    ]
    rows = [("target accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("ECE (lower is better)", "ece")]
    body = [
        f"| {label} | {with_ci(m[k], m.get(k + '_ci'))} | {with_ci(ch[k], ch.get(k + '_ci'))} | "
        + (
            with_ci(ch["gain"], ch.get("gain_ci"), signed=True)
            if k == "accuracy" and "gain" in ch
            else f"{m[k] - ch[k]:+.4f}"
        )
        + " |"
        if comparable
        else f"| {label} | {with_ci(m[k], m.get(k + '_ci'))} |"
        for label, k in rows
    ]
    gain = with_ci(m["gain_over_scratch"], m.get("gain_over_scratch_ci"), signed=True) or "not measured"
    body.append(f"| gain over from-scratch | {gain} | | |" if comparable else f"| gain over from-scratch | {gain} |")
    return head + body, note


def _artifact_links(experiment_id: str | None, run_id: str | None) -> list[str]:
    """Links that work in the MLflow UI serving this registry (relative to its page, any host or prefix)."""
    if not run_id:
        return ["Artifacts: `evaluation/report.md`, `evaluation/confusion_matrix.png` in this version's run."]
    page = f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/evaluation"
    raw = f"get-artifact?path=evaluation%2Fconfusion_matrix.png&run_uuid={run_id}"
    return [
        f"Artifacts (run `{run_id}`): [confusion matrix]({page}/confusion_matrix.png) · "
        f"[evaluation report]({page}/report.md) · [report.json]({page}/report.json) · [confusion matrix image]({raw})",
        "",
        f"![confusion matrix of the selected model]({raw})",
    ]


def _description(
    cfg: PipelineConfig,
    report: dict[str, Any],
    ds: Dataset,
    source: Artifact,
    strategy: str,
    trained: Artifact,
    *,
    version: str | None = None,
    experiment_id: str | None = None,
    run_id: str | None = None,
) -> str:
    gates = report["gates"]
    src, digest = _source_used(source, trained)
    table, champion = _champion_summary(report, version)
    ch = report.get("champion")
    vs = (
        f" (champion v{ch['version']}: {ch['accuracy']:.4f})"
        if ch and ch.get("comparable") and str(ch["version"]) != str(version)
        else ""
    )
    return "\n".join(
        [  # the first line is the preview in the UI's version list: plain text
            f"{cfg.name} · {strategy} · test accuracy {report['metrics']['accuracy']:.4f}{vs} · "
            f"validation {'passed' if gates['passed'] else 'failed'}",
            "",
            f"**{cfg.name}**: strategy `{strategy}` on source `{src}` (digest `{digest[:12]}`).",
            "",
            *table,
            "",
            champion,
            "",
            f"Validation: **{'passed' if gates['passed'] else 'failed'}**: {'; '.join(gates['reasons'])}",
            "",
            f"Data: `{ds.data_hash[:16]}` ({ds.artifact.meta['source']}, splits {ds.artifact.meta['counts']})",
            *_dvc_line(ds.artifact.meta.get("data_version") or {}),
            "",
            f"Source model: `{src}` (digest `{digest[:16]}`); strategy: `{strategy}`",
            "",
            "All strategies and baselines on the test split:",
            "",
            metrics_table(report),
            "",
            "Gain over from-scratch: "
            + with_ci(
                report["metrics"]["gain_over_scratch"], report["metrics"].get("gain_over_scratch_ci"), signed=True
            )
            if report["metrics"]["gain_over_scratch"] is not None
            else f"Gain over from-scratch: not measured ({report['scratch_baseline']})",
            "",
            *_artifact_links(experiment_id, run_id),
        ]
    )


def _tags(cfg: PipelineConfig, inputs: dict[str, Artifact], report: dict[str, Any]) -> dict[str, str]:
    """The tags register sets on the version (besides the integrity manifest of a new one)."""
    source, trained = inputs["model"], inputs["trained"]
    strategy = trained.meta["selected"]
    return {
        "tlops.model_digest": trained.meta["models"][strategy]["digest"],
        **data_tags(inputs["dataset"].meta),
        "tlops.source_model": _source_used(source, trained)[0],
        "tlops.source_digest": _source_used(source, trained)[1],
        "tlops.config_hash": cfg.config_hash,
        "tlops.git_commit": git_commit(),
        "tlops.strategy": strategy,
        "validation_status": "passed"
        if report["gates"]["passed"]
        else "failed: " + "; ".join(report["gates"]["reasons"]),
    }


def unchanged(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact | None:
    """Write the registration without touching MLflow when the registry, as remembered while the
    store is unchanged (:mod:`tlops.tracking.memo`), already holds everything :func:`run` would
    write: a version with this model's digest, carrying these tags and this description, with
    ``challenger`` (and, with ``register.auto_promote``, ``champion``) on it if the gates passed.
    None when anything differs or is not remembered: then :func:`run` runs."""
    from tlops.tracking import memo

    trained, evaluation = inputs["trained"], inputs["evaluation"]
    name = cfg.register.model_name
    digest = trained.meta["models"][trained.meta["selected"]]["digest"]
    version = memo.cached(cfg, ("digest", name, digest))
    state = memo.cached(cfg, ("state", name, version)) if isinstance(version, str) else None
    if not isinstance(state, dict) or integrity.MANIFEST_TAG not in state["tags"]:
        return None
    report = json.loads((evaluation.path / "report.json").read_text())
    tags = _tags(cfg, inputs, report)
    if any(state["tags"].get(k) != v for k, v in tags.items()):
        return None
    description = _description(
        cfg,
        report,
        Dataset(inputs["dataset"]),
        inputs["model"],
        trained.meta["selected"],
        trained,
        version=version,
        run_id=state["run_id"],
        experiment_id=state["experiment_id"],
    )
    passed = bool(report["gates"]["passed"])
    held = state["aliases"]
    wanted = [registry.CHALLENGER] * passed + [registry.CHAMPION] * (passed and cfg.register.auto_promote)
    if state["description"] != description or any(held.get(a) != version for a in wanted):
        return None
    aliases = sorted(a for a, v in held.items() if v == version)
    log.info("register: %s version %s already holds this model, its tags and aliases %s", name, version, aliases)
    return _write(cfg, inputs, out, name, version, aliases, True, None, tags)


def _write(
    cfg: PipelineConfig,
    inputs: dict[str, Artifact],
    out: Path,
    name: str,
    version: str,
    aliases: list[str],
    reused: bool,
    run_id: str | None,
    tags: dict[str, str],
) -> Artifact:
    with write_artifact(out, "registration", config=cfg.register.model_dump(mode="json"), inputs=inputs) as w:
        rec = {
            "model_name": name,
            "version": version,
            "aliases": aliases,
            "reused": reused,
            "run_id": run_id,
            "model_uri": f"models:/{name}/{version}",
            "tags": tags,
        }
        (w.path / "registration.json").write_text(json.dumps(rec, indent=2))
        w.metadata = rec
    return Artifact(Path(out), w.manifest)


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    import mlflow

    from tlops.tracking import memo

    source, trained, evaluation = (inputs[k] for k in ("model", "trained", "evaluation"))
    ds = Dataset(inputs["dataset"])
    report = json.loads((evaluation.path / "report.json").read_text())
    strategy = trained.meta["selected"]
    bundle = trained.path / "models" / strategy
    digest = trained.meta["models"][strategy]["digest"]
    name = cfg.register.model_name
    configure(cfg)
    tags = _tags(cfg, inputs, report)
    existing = registry.find_version_by_tag(name, registry.DIGEST_TAG, digest)
    standalone = mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID")
    with pipeline_run(cfg, run_name=f"{cfg.name}-register") as run:
        if standalone:  # run as its own process (KFP, compose, DVC): record the lineage here
            for step, art in (
                ("ingest", ds.artifact),
                ("pull-model", source),
                ("fine-tune", trained),
                ("evaluate", evaluation),
            ):
                log_step(step, art)
            log_environment({"fine-tune": trained.manifest})
        if existing is not None:
            version, reused = str(existing.version), True
            log.info(
                "register: %s version %s already holds this model (digest %s): not registering again",
                name,
                version,
                digest[:12],
            )
        else:  # torch, pandas and the pyfunc flavour only when there is something to register
            import pandas as pd

            from tlops.models.bundle import load_classifier
            from tlops.serving import package
            from tlops.tracking.pyfunc import predict_frame

            clf = load_classifier(bundle)
            test = ds.load("test")
            raw = test.x[:2] if ds.kind == "image" else list(test.x[:2])
            example = raw if ds.kind == "image" else pd.DataFrame({"text": raw})
            mlflow.log_artifacts(str(evaluation.path), artifact_path="evaluation")
            from tlops.monitoring.reference import log_reference

            log_reference(cfg, ds, bundle, clf)  # what `tlops monitor` compares new inputs against
            # slim and pickle-free: inference files + contract + tlops wheel (checkpoints stay in the workdir)
            info = package.log_model(
                bundle=bundle,
                model_name=name,
                train_x=ds.load("train").x if ds.kind == "image" else None,
                input_example=example,
                output_example=predict_frame(clf, raw, {"model_name": name, "model_version": "1", "model_alias": "x"}),
            )
            # the digest tag is set when the version is created, so a concurrent registration sees it
            mv = mlflow.register_model(info.model_uri, name, tags={registry.DIGEST_TAG: digest})
            version, reused = registry.settle_duplicate(name, str(mv.version), digest)
        c = registry.client()
        mv = c.get_model_version(name, version)
        if not reused:  # hashed as the store holds it: what every loader will check (tracking.integrity)
            from tlops.models.bundle_files import read_spec
            from tlops.serving.package import bundle_files

            uploaded = integrity.tree_digests(bundle, bundle_files(read_spec(bundle)), f"artifacts/{bundle.name}")
            tags[integrity.MANIFEST_TAG] = integrity.record(name, version, mv.run_id, expect=uploaded)
        elif integrity.MANIFEST_TAG not in mv.tags:
            log.warning(
                "register: %s v%s has no integrity manifest (registered before tlops recorded one): loaders refuse it "
                "unless %s=1",
                name,
                version,
                integrity.ALLOW_ENV,
            )
        version_run = c.get_run(mv.run_id) if mv.run_id else None
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)
        c.update_model_version(
            name,
            version,
            description=_description(
                cfg,
                report,
                ds,
                source,
                strategy,
                trained,
                version=version,
                run_id=mv.run_id,
                experiment_id=version_run.info.experiment_id if version_run else None,
            ),
        )
        passed = bool(report["gates"]["passed"])
        if passed:
            c.set_registered_model_alias(name, registry.CHALLENGER, version)
        else:  # registered for the record; the challenger alias only ever names a version that passed
            held = registry.get_alias(name, registry.CHALLENGER)
            log.warning(
                "register: %s v%s registered for the record with validation_status: failed; challenger not moved (%s)",
                name,
                version,
                f"stays at v{held.version}" if held is not None else "no version has passed yet",
            )
        if cfg.register.auto_promote and passed:
            registry.promote(name, version, reason="auto_promote: gates passed")
        elif cfg.register.auto_promote:
            log.warning(
                "register: not promoting %s v%s: gates failed: %s", name, version, "; ".join(report["gates"]["reasons"])
            )
        run_id = run.info.run_id
    # what the registry holds now for this version, not what this step meant to set
    held = registry.client().get_registered_model(name).aliases
    aliases = sorted(a for a, v in held.items() if str(v) == str(version))
    log.info("register: %s version %s -> aliases %s", name, version, ", ".join(aliases) or "none")
    memo.note(cfg, ("digest", name, digest), ("state", name, version))  # what unchanged() asks on a rerun
    return _write(cfg, inputs, out, name, version, aliases, reused, run_id, tags)
