"""pull-model: resolve the source model spec into a backbone bundle artifact."""

from __future__ import annotations

import logging
from pathlib import Path

from tlops.artifacts import Artifact, write_artifact
from tlops.config import PipelineConfig
from tlops.hashing import hash_json
from tlops.models import sources
from tlops.training.common import seed_everything

log = logging.getLogger(__name__)


def _use_registry(cfg: PipelineConfig) -> None:
    """mlflow: specs resolve against the configured registry, also when this step runs alone."""
    if cfg.source.model.startswith("mlflow:"):
        from tlops.tracking.setup import configure

        configure(cfg)


def fingerprint(cfg: PipelineConfig, inputs: dict[str, Artifact]) -> str:
    _use_registry(cfg)
    return hash_json([cfg.section_hash("source"), sources.fingerprint(cfg.source)])


def run(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path) -> Artifact:
    _use_registry(cfg)
    seed_everything(cfg.seed)  # random-init backbones (pretrained: false) must be reproducible
    with write_artifact(out, "source-model", config=cfg.source.model_dump(mode="json"), inputs=inputs) as w:
        spec = sources.pull(cfg.source, w.path / "model")
        w.content_hash = spec["digest"]
        w.metadata = {
            "source": cfg.source.model,
            "backbone_kind": spec["kind"],
            "model_digest": spec["digest"],
            "preprocessing": spec["preprocessing"],
            "feature_dim": spec["feature_dim"],
            **({"mlflow": spec["mlflow"]} if "mlflow" in spec else {}),
        }
    log.info("pull-model: %s (%s, %d-dim features, digest %s)", cfg.source.model, spec["kind"], spec["feature_dim"], spec["digest"][:12])
    return Artifact(Path(out), w.manifest)
