"""The ``batch-predict`` KFP pipeline: ``tlops predict NAME@ALIAS --data URI --out FILE`` as one task.

Compiled from a pipeline config like the transfer pipeline (``tlops compile --pipeline
batch-predict``), so it gets the same image, pod security context, pod labels, resources, secrets
and retries (``tlops.kfp.pipeline.task_configurer``) and, like every tlops component, no
``pip install`` at run time. ``tlops schedule --pipeline batch-predict`` makes it a recurring run.

The task calls ``tlops.serving.predict.predict``, the function behind ``tlops predict``: same
loaders, same verified model load, same shards. The registry is the config's
(``MLFLOW_TRACKING_URI`` in the pod, else ``tracking.uri``), as for the ``register`` step.
Where the result goes:

- always: the task's output artifact ``predictions`` (a directory holding ``predictions.<fmt>``);
- ``out_uri`` a local path (a mounted volume): predict writes there first, so a task retried after
  a kill resumes from its finished shards (``<out_uri>.parts/``), then the file is copied into
  the artifact;
- ``out_uri`` an ``s3://`` URI: the file is uploaded there after it is complete.

Never cached: the alias moves and the data at a URI changes, so a cached result would be stale.
"""

# no `from __future__ import annotations`: KFP reads the pipeline function's annotations as types
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tlops.config import PipelineConfig

NAME = "batch-predict"
FORMATS = ("parquet", "jsonl")
# What task_configurer reads of a step: CPU pool, talks to MLflow and S3 (retried on the cluster).
SPEC = SimpleNamespace(name=NAME, resources="cpu", network=True)

# The component's arguments; its function is generated (tlops.kfp.generated) and only hands
# them to run_batch_predict.
ARGS = (
    ("config", "str"),
    ("model", "str"),
    ("data_uri", "str"),
    ("out_uri", "str"),
    ("out_format", "str"),
    ("data_format", "str"),
    ("shard_size", "int"),
    ("image", "str"),
    ("predictions", "Output[Dataset]"),
)


def function():
    from tlops.kfp.generated import component_function

    return component_function(
        "batch_predict",
        ARGS,
        "tlops predict NAME@ALIAS --data DATA_URI --out FILE, one shard file at a time",
        "tlops.kfp.batch_predict",
        "run_batch_predict",
    )


def component(image: str):
    """``install_kfp_package=False``: kfp is in the image, nothing is installed in the running pod."""
    from kfp import dsl

    return dsl.component(function(), base_image=image, install_kfp_package=False)


def run_batch_predict(args: dict[str, Any]) -> dict[str, Any]:
    """Inside the task: resolve the registry from the config, predict, publish the file."""
    from tlops import logs
    from tlops.errors import ConfigError
    from tlops.kfp.task import config_from_params
    from tlops.serving.predict import predict
    from tlops.storage import is_s3, storage_for
    from tlops.tracking.setup import tracking_uri, use_store

    logs.setup()
    if not args["data_uri"]:
        raise ConfigError("batch-predict: pipeline parameter data_uri is empty (a path, s3:// URI or sklearn:NAME)")
    if args["out_format"] not in FORMATS:
        raise ConfigError(f"batch-predict: out_format {args['out_format']!r}; allowed: {', '.join(FORMATS)}")
    cfg = config_from_params(args["config"], {})
    use_store(tracking_uri(cfg))
    out_dir = Path(args["predictions"].path)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"predictions.{args['out_format']}"
    out_uri = args["out_uri"]
    target = Path(out_uri) if out_uri and not is_s3(out_uri) else out_dir / name
    opts = {} if args["data_format"] == "auto" else {"format": args["data_format"]}
    res = predict(args["model"], args["data_uri"], target, shard_size=int(args["shard_size"]), data_options=opts)
    if target != out_dir / name:
        shutil.copyfile(target, out_dir / name)
    if out_uri and is_s3(out_uri):
        storage_for(out_uri).upload_file(out_dir / name, out_uri)
    meta = {k: v for k, v in res.items() if k != "out" and v is not None}
    args["predictions"].metadata.update({**meta, "file": name, "out_uri": out_uri, "image": args["image"]})
    return res


def pipeline_name(cfg: PipelineConfig) -> str:
    from tlops.kfp.pipeline import pipeline_name as transfer_name

    return f"{transfer_name(cfg)}-{NAME}"


def build_pipeline(cfg: PipelineConfig):
    """The ``@dsl.pipeline`` for one config: its kubernetes section places the task, its
    ``register.model_name`` gives the default model (``<name>@champion``)."""
    import json

    from kfp import dsl

    from tlops.kfp.pipeline import image_for, task_configurer

    image = image_for(cfg)
    op = component(image)
    configure = task_configurer(cfg)
    config_json = json.dumps(cfg.to_dict())  # one line: KFP copies defaults into a header comment

    @dsl.pipeline(
        name=pipeline_name(cfg),
        description=f"tlops batch prediction ({cfg.register.model_name}): tlops predict NAME@ALIAS, resumable shards",
    )
    def batch_predict(
        data_uri: str,
        model: str = f"{cfg.register.model_name}@champion",
        out_uri: str = "",
        out_format: str = "parquet",
        data_format: str = "auto",
        shard_size: int = 1024,
        config: str = config_json,
    ) -> dsl.Dataset:
        task = op(
            config=config,
            model=model,
            data_uri=data_uri,
            out_uri=out_uri,
            out_format=out_format,
            data_format=data_format,
            shard_size=shard_size,
            image=image,
        )
        task.set_display_name(NAME)
        configure(task, SPEC)
        task.set_caching_options(enable_caching=False)  # the alias and the data move: never reuse
        return task.outputs["predictions"]

    return batch_predict


def compile_batch_predict(cfg: PipelineConfig, out: Path) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), str(out))
    return out


def run_kfp_local(cfg: PipelineConfig, **params: Any) -> Path:
    """Run the pipeline with ``kfp.local`` (a subprocess, the installed tlops); returns the
    predictions file in the task's output artifact."""
    from tlops.kfp.pipeline import init_kfp_local

    init_kfp_local(cfg)
    art = build_pipeline(cfg)(**params).output
    return Path(art.path) / art.metadata["file"]
