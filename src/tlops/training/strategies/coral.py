"""coral: Deep CORAL (Sun & Saenko, 2016): aligns the covariance of source and target features."""

from tlops.training.strategies._adapt import strategy
from tlops.training.strategies.base import register

STRATEGY = register(strategy("coral", "Deep CORAL: align source and target feature covariances", 80))
