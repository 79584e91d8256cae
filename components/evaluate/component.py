"""KFP component: evaluate (test metrics, baselines, champion comparison, gates)."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate(
    config: str,
    data_uri: str,
    source_model: str,
    model_name: str,
    dataset: Input[Dataset],
    trained: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
):
    from tlops.runners.kfp_task import log_evaluation, run_task

    art = run_task(
        "evaluate",
        config,
        {"data_uri": data_uri, "source_model": source_model, "model_name": model_name},
        {"dataset": dataset, "trained": trained},
        evaluation,
    )
    log_evaluation(art, metrics, classification)


def make(image: str):
    return dsl.component(evaluate, base_image=image)
