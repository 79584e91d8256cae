"""cdan-self-train: CDAN, then rounds of confidence-thresholded pseudo-label self-training on the
target (see :mod:`tlops.training.strategies._self_train`)."""

from tlops.training.strategies._self_train import strategy
from tlops.training.strategies.base import register

STRATEGY = register(
    strategy("cdan", "CDAN, then self-training on source + confidently pseudo-labelled target (rounds)", 115)
)
