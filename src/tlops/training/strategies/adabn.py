"""adabn: source-only training, then the BatchNorm statistics re-estimated on the target data
(Li et al., AdaBN). Models without BatchNorm keep the source-only weights."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies import _adapt
from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    import numpy as np

    from tlops.features.extract import batches_for
    from tlops.training.adaptation import adabn

    trained, target = _adapt.train(job, out, "adabn", "source-only")
    clf, x = trained.classifier, target.x
    batches = (
        x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx] for idx in batches_for(clf.backbone, x, 128)
    )
    trained.extra["adaptation"]["adabn_samples"] = adabn(clf, batches, prepare=clf.backbone.prepare)
    clf.to("cpu")
    return trained


STRATEGY = register(
    Strategy(
        "adabn",
        "source-only, then BatchNorm statistics re-estimated on the target data (AdaBN)",
        train,
        order=120,
        needs_adapt_from=True,
    )
)
