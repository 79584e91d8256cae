"""KFP component: register (MLflow pyfunc, model version, aliases)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(
    config: str,
    data_uri: str,
    source_model: str,
    model_name: str,
    dataset: Input[Dataset],
    model: Input[Model],
    trained: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
):
    from tlops.runners.kfp_task import run_task

    run_task(
        "register",
        config,
        {"data_uri": data_uri, "source_model": source_model, "model_name": model_name},
        {"dataset": dataset, "model": model, "trained": trained, "evaluation": evaluation},
        registration,
    )


def make(image: str):
    return dsl.component(register, base_image=image)
