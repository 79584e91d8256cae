"""The pipeline DAG, defined once: every runner is built from ``DAG``.

A ``StepSpec`` is a step's whole contract: its inputs (and which step produces each), the kind
of artifact it writes, the config fields it reads and the resources it needs. The reuse key
(``tlops.contract.step_key``), the DVC stages (``runners/dvc.py``), the compose services
(``runners/compose.py``) and the KFP tasks are derived from it. ``params`` must list every
config field the step's code reads, and nothing else: a test walks every field of the config
schema and checks that exactly the steps declaring it change their key and their DVC params.
"""

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
    # config fields the step reads, as dotted paths ("data", "train.strategies"); "*" = all of them.
    # They feed the step key and are the DVC params of the stage.
    params: tuple[str, ...] = ()
    help: str = ""


DAG: tuple[StepSpec, ...] = (
    # seed: the split (and the source-domain split) are seeded
    StepSpec("ingest", "dataset", "dataset", params=("seed", "data"), help="read, validate and split the data"),
    StepSpec(
        "pull-model",
        "source-model",
        "model",
        network=True,
        params=("seed", "source"),  # seed: random-init backbones (pretrained: false)
        help="resolve the source model into a bundle",
    ),
    StepSpec(
        "extract-features",
        "features",
        "features",
        {"dataset": "ingest", "model": "pull-model"},
        # train.strategies: stacking adds the candidates' features; source.selection_score ranks the candidates
        params=("features", "train.strategies", "source.selection_score"),
        help="backbone features per split (content-addressed cache)",
    ),
    StepSpec(
        "fine-tune",
        "trained-models",
        "trained",
        {"dataset": "ingest", "model": "pull-model", "features": "extract-features"},
        resources="gpu",
        # features.batch_size: setfit embeds with the tuned encoder
        params=("seed", "train", "evaluate.scratch_baseline", "features.batch_size"),
        help="train the strategies and the from-scratch baseline",
    ),
    StepSpec(
        "evaluate",
        "evaluation",
        "evaluation",
        {"dataset": "ingest", "trained": "fine-tune"},
        # name: report title and plots; register.model_name + tracking: where the champion is looked up
        params=("name", "evaluate", "register.model_name", "tracking"),
        help="test metrics, baselines, champion comparison, gates",
    ),
    StepSpec(
        "register",
        "registration",
        "registration",
        {"dataset": "ingest", "model": "pull-model", "trained": "fine-tune", "evaluation": "evaluate"},
        network=True,
        reusable=False,
        params=("*",),  # the model version records the hash of the whole config
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
