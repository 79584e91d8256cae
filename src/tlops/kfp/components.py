"""KFP components generated from the DAG: one lightweight Python component per ``StepSpec``.

A component's interface is derived from its step, so it cannot drift from ``tlops.dag``:

- parameters: the pipeline parameters (``PIPELINE_PARAMS``: the config and its overrides) and
  the image the task runs in (a constant set at compile time);
- one input artifact per ``spec.inputs`` entry, typed by the kind its producer writes;
- one output artifact named ``spec.output_name``, typed by ``spec.output``;
- KFP-only extra outputs (``EXTRA_OUTPUTS``: the evaluation's Metrics / ClassificationMetrics).

KFP ships a lightweight component as the source of its function, which the container runs
after ``from kfp.dsl import *``. The source is generated here, registered with ``linecache``
(where ``inspect.getsource`` finds it) and is the same on every machine: it depends on the DAG
only. Its body hands all its arguments to ``tlops.kfp.task.run_task``, which runs the step
with the installed tlops.
"""

from __future__ import annotations

import functools
import linecache
from typing import Any, Callable

from tlops import dag
from tlops.dag import DAG, StepSpec
from tlops.kfp.task import IMAGE_PARAM, PARAM_FIELDS

# Parameters every component takes: the resolved config (YAML) and the values that override it.
PIPELINE_PARAMS = ("config", *PARAM_FIELDS)

# The KFP artifact class (a name in kfp.dsl) for each tlops artifact kind.
KFP_TYPES = {
    "dataset": "Dataset",
    "source-model": "Model",
    "features": "Dataset",
    "trained-models": "Model",
    "evaluation": "Artifact",
    "registration": "Artifact",
}

# Outputs the KFP UI renders, filled from the step's artifact by tlops.kfp.task.run_task.
EXTRA_OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "evaluate": (("metrics", "Metrics"), ("classification", "ClassificationMetrics")),
}


def function_name(step: str) -> str:
    return step.replace("-", "_")


def kfp_type(kind: str) -> str:
    try:
        return KFP_TYPES[kind]
    except KeyError:
        raise KeyError(
            f"artifact kind {kind!r} has no KFP artifact type; add it to tlops.kfp.components.KFP_TYPES"
        ) from None


def signature(spec: StepSpec) -> list[tuple[str, str]]:
    """(argument name, annotation) of the step's component function, in order."""
    producers = {s.name: s for s in DAG}
    args = [(p, "str") for p in (*PIPELINE_PARAMS, IMAGE_PARAM)]
    args += [(name, f"Input[{kfp_type(producers[producer].output)}]") for name, producer in spec.inputs.items()]
    args.append((spec.output_name, f"Output[{kfp_type(spec.output)}]"))
    args += [(name, f"Output[{cls}]") for name, cls in EXTRA_OUTPUTS.get(spec.name, ())]
    return args


def source(spec: StepSpec) -> str:
    """The Python source of the step's component function."""
    args = signature(spec)
    params = "".join(f"    {name}: {annotation},\n" for name, annotation in args)
    passed = "".join(f"        {name!r}: {name},\n" for name, _ in args)
    return (
        f"def {function_name(spec.name)}(\n{params}):\n"
        f"    {f'tlops step {spec.name}: {spec.help}'!r}\n"
        "    from tlops.kfp.task import run_task\n\n"
        f"    run_task({spec.name!r}, {{\n{passed}    }})\n"
    )


@functools.lru_cache(maxsize=None)
def function(step: str) -> Callable[..., None]:
    """The step's component function, compiled from :func:`source` (for ``dsl.component``)."""
    from kfp import dsl

    spec = dag.get(step)
    text = source(spec)
    filename = f"<tlops.kfp.components:{step}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    names = {"Input", "Output", *KFP_TYPES.values(), *(cls for extra in EXTRA_OUTPUTS.values() for _, cls in extra)}
    namespace: dict[str, Any] = {"__name__": __name__, **{n: getattr(dsl, n) for n in names}}
    exec(compile(text, filename, "exec", dont_inherit=True), namespace)  # the generated source above
    return namespace[function_name(step)]


def component(step: str, image: str):
    """The KFP component of ``step``, run in ``image`` (which must have tlops installed).

    ``install_kfp_package=False``: the image already has kfp (a tlops dependency), so the task
    does not ``pip install kfp`` from the network at run time (no package index reachable from
    the task pod needed, nothing unpinned installed into a running pipeline).
    """
    from kfp import dsl

    return dsl.component(function(step), base_image=image, install_kfp_package=False)


def components(image: str) -> dict[str, Any]:
    """Every step's component, keyed by step name."""
    return {s.name: component(s.name, image) for s in DAG}


# features.shards > 1: the ParallelFor task that puts one shard of extract-features into the shared cache
SHARD_TASK = "extract-features-shard"


def shard_function() -> Callable[..., None]:
    """The shard task's function: extract-features's parameters and inputs, a shard index, no
    output (its result is a feature-cache entry; the extract-features task merges them)."""
    from tlops.kfp.generated import component_function

    args = [a for a in signature(dag.get("extract-features")) if not a[1].startswith("Output[")]
    args.insert(len(PIPELINE_PARAMS) + 1, ("shard", "int"))
    return component_function(
        function_name(SHARD_TASK),
        tuple(args),
        "tlops extract-features, one shard of features.shards, into the shared feature cache",
        "tlops.kfp.task",
        "run_shard_task",
    )


def shard_component(image: str):
    from kfp import dsl

    return dsl.component(shard_function(), base_image=image, install_kfp_package=False)
