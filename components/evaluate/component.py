"""KFP component: evaluate, generated from its StepSpec in ``tlops.dag`` by ``tlops.kfp.components``."""

from tlops.kfp.components import component, function

evaluate = function("evaluate")  # the component's Python function (unit tests: call it directly)


def make(image: str):
    return component("evaluate", image)
