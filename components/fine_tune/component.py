"""KFP component: fine-tune (strategies + from-scratch baseline; the GPU step)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output


def fine_tune(
    config: str,
    data_uri: str,
    source_model: str,
    model_name: str,
    dataset: Input[Dataset],
    model: Input[Model],
    features: Input[Dataset],
    trained: Output[Model],
):
    from tlops.runners.kfp_task import run_task

    run_task(
        "fine-tune",
        config,
        {"data_uri": data_uri, "source_model": source_model, "model_name": model_name},
        {"dataset": dataset, "model": model, "features": features},
        trained,
    )


def make(image: str):
    return dsl.component(fine_tune, base_image=image)
