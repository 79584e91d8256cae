"""The ``monitor-and-adapt`` KFP pipeline: ``tlops monitor`` on new inputs, and on a shift the
adaptation run of ``tlops adapt`` on the cluster, as a schedulable pipeline.

Three parts, each an existing piece:

1. ``monitor`` (one task): :func:`tlops.monitoring.adapt.plan` monitors ``model`` on ``data_uri``
   (report logged to the version's MLflow run and kept as the task's ``report`` artifact, with the
   adaptation config) and returns the verdict;
2. ``dsl.If(verdict != "ok")``: ``adapt-config`` reads the config out of the report, and the
   transfer-learning pipeline of this very config
   (:func:`tlops.kfp.pipeline.build`, the six-step DAG with its GPU node pool and retries) as a
   sub-pipeline, given the adaptation config as its ``config`` parameter;
3. ``describe-adaptation`` (one task, after it): monitors the version that run registered on the
   same inputs and writes both label-free estimates into its description (``tlops adapt --run``
   does the same in-process).

``tlops compile|submit|schedule --pipeline monitor-and-adapt`` (``--param data_uri=...``; optional
``strategies``: comma-separated, ``overrides``: a JSON list of ``key=value`` as ``tlops adapt --set``). Never
cached: the alias moves and the data at a URI changes. The registry is the config's, as for the
``register`` step.
"""

# no `from __future__ import annotations`: KFP reads the component functions' annotations as types
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tlops.config import PipelineConfig
from tlops.kfp.generated import component_function

NAME = "monitor-and-adapt"
# What task_configurer reads of a task: CPU pool, talks to MLflow and S3 (retried on the cluster).
MONITOR = SimpleNamespace(name="monitor", resources="cpu", network=True)
CONFIG = SimpleNamespace(name="adapt-config", resources="cpu", network=False)
DESCRIBE = SimpleNamespace(name="describe-adaptation", resources="cpu", network=True)

MONITOR_ARGS = (
    ("config", "str"),
    ("model", "str"),
    ("data_uri", "str"),
    ("data_format", "str"),
    ("strategies", "str"),
    ("overrides", "str"),
    ("image", "str"),
    ("report", "Output[Artifact]"),
)
# the verdict is the task's one return value ("Output"): the dsl.If reads it (kfp.local resolves a
# condition on a task's "Output" only); the adaptation config travels in the report artifact
CONFIG_FILE = "adapt_config.json"
CONFIG_ARGS = (("report", "Input[Artifact]"), ("image", "str"))
DESCRIBE_ARGS = (
    ("config", "str"),
    ("adapt_config", "str"),
    ("data_uri", "str"),
    ("data_format", "str"),
    ("report", "Input[Artifact]"),
    ("image", "str"),
    ("adapted", "Output[Artifact]"),
)


def _config(args: dict[str, Any]) -> PipelineConfig:
    from tlops import logs
    from tlops.kfp.task import config_from_params
    from tlops.tracking.setup import tracking_uri, use_store

    logs.setup()
    cfg = config_from_params(args["config"], {})
    use_store(tracking_uri(cfg))
    return cfg


def run_monitor(args: dict[str, Any]) -> str:
    """Inside the ``monitor`` task: the verdict; the report and the adaptation config (JSON) go
    into the ``report`` artifact."""
    from tlops.errors import ConfigError
    from tlops.monitoring.adapt import plan
    from tlops.steps.extract_features import cache_root

    if not args["data_uri"]:
        raise ConfigError(f"{NAME}: pipeline parameter data_uri is empty (a path, s3:// URI or sklearn:NAME)")
    cfg = _config(args)
    out = Path(args["report"].path)
    strategies = [s.strip() for s in args["strategies"].split(",") if s.strip()] or None
    adapt_cfg, before = plan(
        args["model"],
        args["data_uri"],
        cache_dir=cache_root(cfg),
        strategies=strategies,
        data_options=_data_options(args),
        workdir=cfg.workdir,
        monitor_out=out,
        overrides=json.loads(args["overrides"]) if args["overrides"] else None,
    )
    (out / CONFIG_FILE).write_text(json.dumps(adapt_cfg))
    args["report"].metadata.update(
        {"verdict": before["verdict"], "estimate": before["accuracy"]["estimate"], "model": args["model"]}
    )
    return before["verdict"]


def run_adapt_config(args: dict[str, Any]) -> str:
    """Inside ``adapt-config``: the adaptation config the monitor task wrote, as the transfer
    pipeline's ``config`` parameter."""
    return (Path(args["report"].path) / CONFIG_FILE).read_text()


def run_describe(args: dict[str, Any]) -> dict[str, Any]:
    """Inside ``describe-adaptation``: monitor the version the adaptation run registered and put
    the estimates before and after into its description."""
    from tlops.config import validate_config
    from tlops.errors import ModelError
    from tlops.monitoring.adapt import describe_version
    from tlops.steps.extract_features import cache_root
    from tlops.tracking import registry

    cfg = _config(args)
    adapt_cfg = validate_config(json.loads(args["adapt_config"]))
    name = adapt_cfg.register.model_name
    # the register task tagged the version it registered with the hash of the config it ran
    mv = registry.find_version_by_tag(name, "tlops.config_hash", adapt_cfg.config_hash)
    if mv is None:
        raise ModelError(f"{NAME}: no version of {name} carries tlops.config_hash {adapt_cfg.config_hash[:12]}")
    before = json.loads((Path(args["report"].path) / "monitor.json").read_text())
    res = describe_version(
        name,
        str(mv.version),
        before,
        args["data_uri"],
        cache_dir=cache_root(cfg),
        data_options=_data_options(args),
        out=Path(args["adapted"].path),
    )
    args["adapted"].metadata.update(res)
    return res


def _data_options(args: dict[str, Any]) -> dict[str, Any]:
    return {} if args["data_format"] == "auto" else {"format": args["data_format"]}


def components(image: str) -> tuple[Any, Any, Any]:
    """``install_kfp_package=False``: kfp is in the image, nothing is installed in the running pod."""
    from kfp import dsl

    monitor = component_function(
        "monitor",
        MONITOR_ARGS,
        "tlops monitor NAME@ALIAS --data DATA_URI, and the tlops adapt config",
        "tlops.kfp.monitor_adapt",
        "run_monitor",
        returns="str",
    )
    config = component_function(
        "adapt_config",
        CONFIG_ARGS,
        "the tlops adapt config the monitor task wrote",
        "tlops.kfp.monitor_adapt",
        "run_adapt_config",
        returns="str",
    )
    describe = component_function(
        "describe_adaptation",
        DESCRIBE_ARGS,
        "monitor the adapted version; both estimates into its description",
        "tlops.kfp.monitor_adapt",
        "run_describe",
    )
    return (
        dsl.component(monitor, base_image=image, install_kfp_package=False),
        dsl.component(config, base_image=image, install_kfp_package=False),
        dsl.component(describe, base_image=image, install_kfp_package=False),
    )


def pipeline_name(cfg: PipelineConfig) -> str:
    from tlops.kfp.pipeline import pipeline_name as transfer_name

    return f"{transfer_name(cfg)}-{NAME}"


def build_pipeline(cfg: PipelineConfig):
    """The ``@dsl.pipeline`` for one config: the model it watches is ``register.model_name@champion``
    by default; the adaptation run is this config's transfer pipeline (same image, node pools)."""
    from kfp import dsl

    from tlops.config import validate_config
    from tlops.kfp.pipeline import build_pipeline as transfer_pipeline
    from tlops.kfp.pipeline import image_for, task_configurer

    image = image_for(cfg)
    monitor_op, config_op, describe_op = components(image)
    # the adaptation run's config arrives at run time, so no step of it may be served from KFP's
    # cache: the transfer pipeline's cache keys are computed from the config it was compiled with
    raw = cfg.to_dict()
    transfer = transfer_pipeline(validate_config({**raw, "kubernetes": {**raw["kubernetes"], "caching": False}}))
    configure = task_configurer(cfg)
    config_json = json.dumps(raw)  # one line: KFP copies defaults into a header comment

    @dsl.pipeline(
        name=pipeline_name(cfg),
        description=f"tlops monitor and adapt ({cfg.register.model_name}): tlops monitor, on a shift tlops adapt",
    )
    def monitor_and_adapt(
        data_uri: str,
        model: str = f"{cfg.register.model_name}@champion",
        data_format: str = "auto",
        strategies: str = "",
        overrides: str = "",
        config: str = config_json,
    ):
        mon = monitor_op(
            config=config,
            model=model,
            data_uri=data_uri,
            data_format=data_format,
            strategies=strategies,
            overrides=overrides,
            image=image,
        )
        mon.set_display_name("monitor")
        configure(mon, MONITOR)
        mon.set_caching_options(enable_caching=False)
        with dsl.If(mon.outputs["Output"] != "ok", name="shift"):
            adapt_cfg = config_op(report=mon.outputs["report"], image=image)
            adapt_cfg.set_display_name("adapt-config")
            configure(adapt_cfg, CONFIG)
            adapt_cfg.set_caching_options(enable_caching=False)
            run = transfer(config=adapt_cfg.output)
            run.set_display_name("adapt")
            run.set_caching_options(enable_caching=False)
            desc = describe_op(
                config=config,
                adapt_config=adapt_cfg.output,
                data_uri=data_uri,
                data_format=data_format,
                report=mon.outputs["report"],
                image=image,
            ).after(run)
            desc.set_display_name("describe-adaptation")
            configure(desc, DESCRIBE)
            desc.set_caching_options(enable_caching=False)

    return monitor_and_adapt


def compile_monitor_adapt(cfg: PipelineConfig, out: Path) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), str(out))
    return out


def run_kfp_local(cfg: PipelineConfig, **params: Any) -> None:
    """Run the pipeline with ``kfp.local`` (one subprocess per task, the installed tlops)."""
    from tlops.kfp.pipeline import init_kfp_local

    init_kfp_local(cfg)
    build_pipeline(cfg)(**params)
