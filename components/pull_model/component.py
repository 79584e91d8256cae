"""KFP component: pull-model, generated from its StepSpec in ``tlops.dag`` by ``tlops.kfp.components``."""

from tlops.kfp.components import component, function

pull_model = function("pull-model")  # the component's Python function (unit tests: call it directly)


def make(image: str):
    return component("pull-model", image)
