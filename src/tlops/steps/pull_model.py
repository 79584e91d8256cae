"""pull-model: resolve the source model spec into a backbone bundle artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.hashing import hash_json
from tlops.models import sources

log = logging.getLogger(__name__)


def specs(cfg: PipelineConfig) -> list[str]:
    """The source model, then any candidates to rank against it."""
    return [cfg.source.model, *(cfg.source.candidates or [])]


def _use_registry(cfg: PipelineConfig) -> None:
    """mlflow: specs resolve against the configured registry, also when this step runs alone."""
    if any(s.startswith("mlflow:") for s in specs(cfg)):
        from tlops.tracking.setup import configure

        configure(cfg)


def stamp(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> list:
    """What each spec resolves to right now without pulling it: the registry version behind an
    ``mlflow:`` alias (remembered while the store is unchanged: :mod:`tlops.tracking.memo`, so an
    unchanged rerun imports no MLflow), the stat stamp of a bundle dir or weights file."""
    from tlops.tracking import memo

    def resolve(ref: str) -> Any:
        return memo.lookup(cfg, ("resolve", ref))

    return [sources.fingerprint(cfg.source.model_copy(update={"model": m}), resolve) for m in specs(cfg)]


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    """``model/`` holds ``source.model``; with ``source.candidates``, ``candidates/<i>/`` hold the
    others (extract-features ranks them all on the target data and picks one)."""
    from tlops.training.common import seed_everything  # torch: imported when the step runs, not for its fingerprint

    _use_registry(cfg)
    with write_artifact(out, "source-model", config=cfg.source.model_dump(mode="json"), inputs=inputs) as w:
        pulled = []
        for i, model in enumerate(specs(cfg)):
            seed_everything(cfg.seed)  # random-init backbones (pretrained: false) must be reproducible
            where = "model" if i == 0 else f"candidates/{i}"
            spec = sources.pull(cfg.source.model_copy(update={"model": model}), w.path / where)
            pulled.append((model, where, spec))
            log.info(
                "pull-model: %s (%s, %d-dim features, digest %s)",
                model,
                spec["kind"],
                spec["feature_dim"],
                spec["digest"][:12],
            )
        _, _, spec = pulled[0]
        # weights and how they are fed: the same weights at another image size give other features
        w.content_hash = hash_json([[p[2]["digest"], p[2]["preprocessing"]] for p in pulled])
        w.metadata = {
            "source": cfg.source.model,
            "backbone_kind": spec["kind"],
            "model_digest": spec["digest"],
            "preprocessing": spec["preprocessing"],
            "feature_dim": spec["feature_dim"],
            **({"mlflow": spec["mlflow"]} if "mlflow" in spec else {}),
        }
        if len(pulled) > 1:
            w.metadata["candidates"] = [
                {
                    "index": i,
                    "source": m,
                    "path": where,
                    "model_digest": sp["digest"],
                    "preprocessing": sp["preprocessing"],
                    "feature_dim": sp["feature_dim"],
                }
                for i, (m, where, sp) in enumerate(pulled)
            ]
    return Artifact(Path(out), w.manifest)
