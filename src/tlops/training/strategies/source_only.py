"""source-only: the adaptation baseline; trained on the labelled source domain only."""

from tlops.training.strategies._adapt import strategy
from tlops.training.strategies.base import register

STRATEGY = register(strategy("source-only", "domain adaptation baseline: trained on data.adapt_from only", 70))
