"""cdan: conditional adversarial adaptation (Long et al., 2018): the discriminator sees the
features conditioned on the classifier's predictions (multilinear map)."""

from tlops.training.strategies._adapt import strategy
from tlops.training.strategies.base import register

STRATEGY = register(strategy("cdan", "conditional domain-adversarial training (CDAN)", 110))
