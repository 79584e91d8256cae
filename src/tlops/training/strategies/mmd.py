"""mmd: multi-kernel Gaussian MMD between source and target features (DAN, Long et al., 2015)."""

from tlops.training.strategies._adapt import strategy
from tlops.training.strategies.base import register

STRATEGY = register(strategy("mmd", "multi-kernel MMD between source and target features (DAN)", 90))
