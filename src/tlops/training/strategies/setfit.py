"""setfit: few-shot text (Tunstall et al., 2022): contrastive pair tuning of the sentence
encoder (``train.setfit``), then the linear probe on the tuned embeddings."""

from __future__ import annotations

from pathlib import Path

from tlops.training.strategies.base import Job, Strategy, Trained, register


def train(job: Job, out: Path) -> Trained:
    from tlops.features.extract import extract
    from tlops.models.bundle import Classifier, load_backbone
    from tlops.training.checkpoints import Checkpoints
    from tlops.training.common import seed_everything
    from tlops.training.probe import train_probe
    from tlops.training.setfit import contrastive_tune

    cfg, train, val, rt = job.cfg, job.train, job.val, job.runtime
    seed_everything(cfg.seed)
    clf = Classifier(load_backbone(job.source), len(job.classes), job.classes)
    ckpts = Checkpoints(rt, out, "setfit", cfg.train.setfit.epochs) if rt.checkpoint_dir is not None else None
    pair_hist = contrastive_tune(clf, train, cfg.train.setfit, cfg.seed, runtime=rt, checkpoints=ckpts)
    # the tuned encoder's embeddings, on the runtime's device where it trained
    bs = cfg.features.batch_size
    f_val = extract(clf.backbone, val.x, bs, desc="setfit val") if val is not None and len(val) else None
    head, hist = train_probe(
        extract(clf.backbone, train.x, bs, desc="setfit train"),
        train.y,
        f_val,
        val.y if f_val is not None else None,
        len(job.classes),
        cfg.train,
        cfg.seed,
        runtime=rt,
        name="setfit",
    )
    clf.to("cpu")
    clf.head.load_state_dict(head.state_dict())
    return Trained(
        clf, hist, {"setfit": {"pairs": pair_hist[-1]["pairs"], "pair_loss": [h["pair_loss"] for h in pair_hist]}}
    )


STRATEGY = register(
    Strategy(
        "setfit",
        "few-shot text: contrastive pair tuning of the sentence encoder, then a linear head (train.setfit)",
        train,
        order=60,
        modalities=("text",),
    )
)
