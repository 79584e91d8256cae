"""What a strategy is (:class:`Strategy`), what it trains from (:class:`Job`) and what it
returns (:class:`Trained`), plus the registry itself. Torch-free at import: the config module
reads the registry to validate ``train.strategies``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tlops.errors import ConfigError

if TYPE_CHECKING:  # heavy: imported by the training functions, not by config validation
    import numpy as np
    from torch import nn

    from tlops.artifacts import Artifact
    from tlops.data.dataset import Dataset, Split
    from tlops.models.bundle import Classifier
    from tlops.training.runtime import Runtime

MODALITIES = ("image", "text")
# how a user gets a model of each modality (for messages)
MODALITY_SOURCES = {"image": "an image model (timm:...)", "text": "a text model (hf:...)"}


@dataclass
class Probe:
    """The linear probe on the cached features of the selected source model (trained once per step)."""

    head: nn.Linear
    history: list[dict[str, Any]]
    seconds: float


@dataclass
class Job:
    """Everything a strategy trains from; built once by the fine-tune step."""

    cfg: Any  # tlops.config.PipelineConfig (not imported: the config module imports this registry)
    dataset: Dataset
    train: Split
    val: Split | None
    features: dict[str, np.ndarray]  # cached features per split (``stack_<split>`` for stacking)
    model: Artifact  # pull-model's artifact: source.model (+ source.candidates)
    source: Path  # the selected source bundle inside ``model`` (LogME ranking)
    runtime: Runtime  # device, precision, threads, DDP rank/world, checkpoint dir: every loop gets it
    probe: Probe | None = None  # set when a strategy with ``uses_probe`` is configured

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


@dataclass
class Trained:
    classifier: Classifier
    history: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific facts for the artifact's metadata


@dataclass(frozen=True)
class Strategy:
    """One way to transfer the source model, registered by name with what it needs."""

    name: str
    summary: str  # one line: ``tlops strategies`` and docs/strategies.md
    train: Callable[[Job, Path], Trained]  # (job, the strategy's output dir) -> trained classifier
    order: int  # position in listings (the order ``train.strategies`` documents)
    modalities: tuple[str, ...] = MODALITIES  # source models it works on
    needs_adapt_from: bool = False  # labelled source-domain data (``data.adapt_from``)
    needs_candidates: bool = False  # more source models (``source.candidates``)
    trains_backbone: bool = True  # False: head only (the backbone stays the source model)
    uses_probe: bool = False  # starts from (or is) the shared linear probe; its time counts toward this strategy

    def needs(self) -> list[str]:
        return [
            k
            for k, on in (("data.adapt_from", self.needs_adapt_from), ("source.candidates", self.needs_candidates))
            if on
        ]


REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    bad = set(strategy.modalities) - set(MODALITIES)
    if bad:
        raise ValueError(f"strategy {strategy.name!r}: unknown modalities {sorted(bad)}; known: {MODALITIES}")
    REGISTRY[strategy.name] = strategy
    return strategy


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Strategy:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"train.strategies: unknown strategy {name!r}; valid strategies: {', '.join(REGISTRY)}"
        ) from None


def for_modality(modality: str) -> list[str]:
    return [s.name for s in REGISTRY.values() if modality in s.modalities]


def problems(cfg: Any, *, modality: str | None, model: str) -> list[str]:
    """Why the strategies of ``cfg`` (a PipelineConfig) cannot run, one message each (empty: they
    all fit): ``data.adapt_from`` and ``source.candidates`` when a strategy needs them, and the
    source model's ``modality`` (None when it is not known yet: a bundle directory or an MLflow
    model before pull-model); ``model`` names it in messages (e.g. "source.model timm:resnet18")."""
    strategies = cfg.train.strategies
    has_adapt_from, has_candidates = cfg.data.adapt_from is not None, bool(cfg.source.candidates)
    chosen = [get(s) for s in strategies]
    out = []
    adapt = [s.name for s in chosen if s.needs_adapt_from and not has_adapt_from]
    if adapt:
        verb = "needs" if len(adapt) == 1 else "need"
        out.append(f"train.strategies: {', '.join(adapt)} {verb} data.adapt_from (labelled source-domain data)")
    for s in chosen:
        if s.needs_candidates and not has_candidates:
            out.append(f"train.strategies: {s.name} needs source.candidates (the models to stack with source.model)")
    if modality is not None:
        for s in chosen:
            if modality not in s.modalities:
                wanted = " or ".join(MODALITY_SOURCES[m] for m in s.modalities)
                out.append(
                    f"train.strategies: {s.name} needs {wanted}, but {model} is an {modality} model; "
                    f"strategies for {modality} models: {', '.join(for_modality(modality))}"
                )
    return out
