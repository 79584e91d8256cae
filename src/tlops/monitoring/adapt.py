"""``tlops adapt NAME@ALIAS --data NEW``: close the loop after ``tlops monitor`` flags a shift.

The monitor says the new inputs no longer look like the training data and estimates the
accuracy they cost. This module turns that into an unsupervised domain-adaptation run of the
same pipeline, so the fix is tracked, gated and registered like any other model:

- the registered version's own training data (recorded with its monitoring reference, see
  :mod:`.reference`) becomes ``data.adapt_from``, the labelled source domain;
- the new inputs become the target, almost all of it unlabelled (``data.unlabelled``);
- ``train.strategies`` are the adaptation strategies, selected on source-domain validation
  (``train.select_on: source_val``): no target label trains or chooses a model. Target labels,
  where the new data has them, only score the test split;
- it registers under the same model name, so the adapted model becomes the ``challenger`` next
  to the champion it is meant to replace; promotion stays a reviewer's ``tlops promote``.

With ``run=True`` the config goes through the in-process runner, the monitor is run again on
the adapted version with the same inputs, and the version's description gets both estimates
(before: the monitored model; after: the adapted one), which is what a reviewer compares.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

#: the adaptation strategies tried by default (each is cheap on CPU; shot and the self-training
#: pair cost several times more and are one --strategies away)
DEFAULT_STRATEGIES = ("source-only", "coral", "dann", "adabn")
#: the data fields that say how a file is read: the source domain keeps the model's, the target
#: takes the monitor's --format (or the model's when not given)
READ_FIELDS = ("format", "text_column", "label_column", "columns", "quoting", "encoding")
UNLABELLED = 0.9  # of the target's train pool; the rest keeps its labels for nothing but the record


def training_config(meta: dict[str, Any], model: str) -> dict[str, Any]:
    """The pipeline config that trained the version, from its monitoring reference."""
    from tlops.errors import ModelError

    cfg = meta.get("pipeline_config")
    if not cfg:
        raise ModelError(
            f"{model}: its monitoring reference does not record the training config (registered by an older "
            "tlops); register it again, or write the adaptation config by hand (docs/monitoring.md)"
        )
    return cfg


def adapt_config(
    orig: dict[str, Any],
    data: str,
    *,
    model_name: str,
    strategies: Optional[list[str]] = None,
    data_options: Optional[dict[str, Any]] = None,
    workdir: Optional[str] = None,
) -> dict[str, Any]:
    """The adaptation config: ``orig``'s data as the source domain, ``data`` as the target."""
    from tlops.errors import ConfigError

    d = orig["data"]
    if not d.get("source"):
        raise ConfigError(
            f"{model_name}: its training data is a DVC dataset (data.dvc); data.adapt_from takes a path or s3:// "
            "URI: write the adaptation config with the dataset's path (docs/monitoring.md)"
        )
    new = copy.deepcopy(orig)
    new.pop("tune", None)  # a search over the source task's settings is not this run's
    src_read = {f: d[f] for f in READ_FIELDS if d.get(f) is not None}
    tgt_read = {**src_read, **(data_options or {})}
    split = dict(d.get("split") or {})
    new["name"] = f"{orig['name']}-adapt"
    if workdir is not None:
        new["workdir"] = str(workdir)
    new["data"] = {
        "source": data,
        **tgt_read,
        "classes": d.get("classes"),
        "split": split,
        "unlabelled": UNLABELLED,
        "image_size": d.get("image_size"),
        "min_per_class": d.get("min_per_class", 3),
        "adapt_from": {
            "source": d["source"],
            **src_read,
            "val": max(0.1, float(split.get("val") or 0.2)),
        },
    }
    new["train"] = {
        **orig["train"],
        "strategies": list(strategies or DEFAULT_STRATEGIES),
        "select_on": "source_val",  # label-free: the source domain's validation split
    }
    # scratch on the few labelled target rows says nothing about adaptation; the champion is
    # the comparison that matters (evaluate scores both on the target test split)
    new["evaluate"] = {**orig["evaluate"], "scratch_baseline": False}
    new["register"] = {**orig["register"], "model_name": model_name, "auto_promote": False}
    return new


def plan(
    model: str,
    data: str,
    *,
    cache_dir: Optional[Path],
    strategies: Optional[list[str]] = None,
    data_options: Optional[dict[str, Any]] = None,
    workdir: Optional[str] = None,
    monitor_out: Optional[Path] = None,
    thresholds: Any = None,
    overrides: Optional[list[str]] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Monitor ``model`` on ``data`` and write nothing yet: returns (adaptation config, monitor
    result). ``overrides`` are ``--set key=value`` items applied to the adaptation config."""
    from tlops.config import apply_overrides, validate_config
    from tlops.monitoring import reference
    from tlops.monitoring.monitor import Thresholds, monitor
    from tlops.serving.registry import resolve
    from tlops.tracking import registry

    ref = resolve(model)
    mv = registry.client().get_model_version(ref.name, ref.version)
    with tempfile.TemporaryDirectory(prefix="tlops-adapt-") as tmp:
        _, meta = reference.load(mv.run_id, Path(tmp))
    cfg = adapt_config(
        training_config(meta, model),
        data,
        model_name=ref.name,
        strategies=strategies,
        data_options=data_options,
        workdir=workdir,
    )
    cfg = apply_overrides(cfg, overrides or [])
    validate_config(copy.deepcopy(cfg))  # a config that cannot work fails here, before the monitor runs
    with tempfile.TemporaryDirectory(prefix="tlops-adapt-") as tmp:
        before = monitor(
            model,
            data,
            monitor_out or Path(tmp) / "monitor",
            cache_dir=cache_dir,
            data_options=data_options,
            thresholds=thresholds or Thresholds(),
        )
    return cfg, before


def describe(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The description section a reviewer reads: the monitor's estimate before and after."""

    def line(label: str, r: dict[str, Any]) -> str:
        a = r["accuracy"]
        return (
            f"| {label} | v{r['model_version']} | {r['verdict']} | {a['estimate']:.3f} [{a['low']:.3f}, "
            f"{a['high']:.3f}] | {a['held_out_accuracy']:.3f} |"
        )

    return "\n".join(
        [
            "## Adaptation (tlops adapt)",
            "",
            f"Adapted to `{before['data']}` ({before['n']} inputs, no target label used for training or selection).",
            "Label-free accuracy estimate on those inputs (ATC, bootstrap interval), from `tlops monitor`:",
            "",
            "| | version | verdict | estimated accuracy | held-out accuracy (validation + test) |",
            "|---|---|---|---|---|",
            line("before (monitored model)", before),
            line("after (this version)", after),
        ]
    )


def describe_version(
    name: str, version: str, before: dict[str, Any], data: str, *, out: Path, **monitor_kw: Any
) -> dict[str, Any]:
    """Monitor the adapted version on the same inputs and write both estimates into its
    description (a rerun replaces its own section). Returns the monitor's result."""
    from tlops.monitoring.monitor import monitor
    from tlops.tracking import registry

    after = monitor(f"{name}/{version}", data, out, **monitor_kw)
    c = registry.client()
    desc = c.get_model_version(name, version).description or ""
    head = desc.split("\n## Adaptation (tlops adapt)")[0].rstrip()
    section = describe(before, after)
    c.update_model_version(name, version, description=f"{head}\n\n{section}\n" if head else section + "\n")
    return after


def run_adapted(cfg_dict: dict[str, Any], before: dict[str, Any], data: str, **monitor_kw: Any) -> dict[str, Any]:
    """Run the adaptation config in-process, monitor the new version on the same inputs and put
    both estimates in its description. Returns a summary."""
    from tlops.config import validate_config
    from tlops.runners.local import run_pipeline

    cfg = validate_config(copy.deepcopy(cfg_dict))
    result = run_pipeline(cfg)
    reg = json.loads((result.artifact("register").path / "registration.json").read_text())
    name, version = reg["model_name"], reg["version"]
    with tempfile.TemporaryDirectory(prefix="tlops-adapt-") as tmp:
        after = describe_version(name, version, before, data, out=Path(tmp) / "monitor", **monitor_kw)
    evaluation = result.artifact("evaluate")
    gates = evaluation.meta["gates_passed"]
    report = json.loads((evaluation.path / "report.json").read_text())
    champion = report.get("champion") or {}
    log.info(
        "adapt: %s v%s (%s): estimated accuracy %.3f -> %.3f",
        name,
        version,
        "challenger" if "challenger" in reg["aliases"] else "gates failed: not challenger",
        before["accuracy"]["estimate"],
        after["accuracy"]["estimate"],
    )
    return {
        "model_name": name,
        "version": version,
        "aliases": reg["aliases"],
        "gates_passed": gates,
        "before": before["accuracy"]["estimate"],
        "after": after["accuracy"]["estimate"],
        "verdict_before": before["verdict"],
        "verdict_after": after["verdict"],
        # scored on the labelled test rows of the new data (labels used for nothing else)
        "test_accuracy": report["metrics"]["accuracy"],
        "champion_test_accuracy": champion.get("accuracy"),
        "champion_version": champion.get("version"),
        "run_id": result.run_id,
    }
