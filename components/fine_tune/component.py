"""KFP component: fine-tune, generated from its StepSpec in ``tlops.dag`` by ``tlops.kfp.components``."""

from tlops.kfp.components import component, function

fine_tune = function("fine-tune")  # the component's Python function (unit tests: call it directly)


def make(image: str):
    return component("fine-tune", image)
