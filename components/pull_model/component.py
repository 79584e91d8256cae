"""KFP component: pull-model (resolve the source model spec into a bundle)."""

from kfp import dsl
from kfp.dsl import Model, Output


def pull_model(config: str, data_uri: str, source_model: str, model_name: str, model: Output[Model]):
    from tlops.runners.kfp_task import run_task

    run_task(
        "pull-model", config, {"data_uri": data_uri, "source_model": source_model, "model_name": model_name}, {}, model
    )


def make(image: str):
    return dsl.component(pull_model, base_image=image)
