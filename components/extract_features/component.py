"""KFP component: extract-features, generated from its StepSpec in ``tlops.dag`` by ``tlops.kfp.components``."""

from tlops.kfp.components import component, function

extract_features = function("extract-features")  # the component's Python function (unit tests: call it directly)


def make(image: str):
    return component("extract-features", image)
