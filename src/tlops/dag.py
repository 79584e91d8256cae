"""The pipeline DAG, defined once. Every runner is built from ``DAG``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepSpec:
    name: str
    output: str  # artifact kind written by the step
    output_name: str  # how consumers name this step's artifact (their input name)
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> producing step
    resources: str = "cpu"  # "cpu" or "gpu" (node pool class)
    network: bool = False  # talks to remote services (retries on the cluster)
    reusable: bool = True  # the runner may reuse a finished artifact with the same fingerprint
    params: tuple[str, ...] = ()  # config fields the step reads (DVC tracks them in params.yaml)
    help: str = ""


DAG: tuple[StepSpec, ...] = (
    StepSpec("ingest", "dataset", "dataset", params=("seed", "data"), help="read, validate and split the data"),
    StepSpec(
        "pull-model",
        "source-model",
        "model",
        network=True,
        params=("seed", "source"),
        help="resolve the source model into a bundle",
    ),
    StepSpec(
        "extract-features",
        "features",
        "features",
        {"dataset": "ingest", "model": "pull-model"},
        params=("features",),
        help="backbone features per split (content-addressed cache)",
    ),
    StepSpec(
        "fine-tune",
        "trained-models",
        "trained",
        {"dataset": "ingest", "model": "pull-model", "features": "extract-features"},
        resources="gpu",
        params=("seed", "train", "evaluate.scratch_baseline"),
        help="train the strategies and the from-scratch baseline",
    ),
    StepSpec(
        "evaluate",
        "evaluation",
        "evaluation",
        {"dataset": "ingest", "trained": "fine-tune"},
        params=("evaluate", "register.model_name"),
        help="test metrics, baselines, champion comparison, gates",
    ),
    StepSpec(
        "register",
        "registration",
        "registration",
        {"dataset": "ingest", "model": "pull-model", "trained": "fine-tune", "evaluation": "evaluate"},
        network=True,
        reusable=False,
        params=("register", "tracking"),
        help="log the pyfunc model, register a version, set aliases",
    ),
)

STEP_NAMES = tuple(s.name for s in DAG)


def get(name: str) -> StepSpec:
    for s in DAG:
        if s.name == name:
            return s
    raise KeyError(f"unknown step '{name}'; steps: {', '.join(STEP_NAMES)}")


def _check() -> None:
    """Inputs name their producer's output_name and come earlier in the DAG."""
    seen: dict[str, StepSpec] = {}
    for s in DAG:
        for name, producer in s.inputs.items():
            assert producer in seen, f"{s.name}: input {name} from {producer}, which is not an earlier step"
            assert seen[producer].output_name == name, f"{s.name}: input {name} != {producer}.output_name"
        seen[s.name] = s


_check()
