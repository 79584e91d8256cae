"""KFP component: ingest (read, validate and split the data)."""

from kfp import dsl
from kfp.dsl import Dataset, Output


def ingest(config: str, data_uri: str, source_model: str, model_name: str, dataset: Output[Dataset]):
    from tlops.runners.kfp_task import run_task

    run_task(
        "ingest", config, {"data_uri": data_uri, "source_model": source_model, "model_name": model_name}, {}, dataset
    )


def make(image: str):
    return dsl.component(ingest, base_image=image)
