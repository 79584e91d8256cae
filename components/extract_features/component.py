"""KFP component: extract-features (backbone features through the content-addressed cache)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output


def extract_features(
    config: str,
    data_uri: str,
    source_model: str,
    model_name: str,
    dataset: Input[Dataset],
    model: Input[Model],
    features: Output[Dataset],
):
    from tlops.runners.kfp_task import run_task

    run_task(
        "extract-features",
        config,
        {"data_uri": data_uri, "source_model": source_model, "model_name": model_name},
        {"dataset": dataset, "model": model},
        features,
    )


def make(image: str):
    return dsl.component(extract_features, base_image=image)
