"""dann: domain-adversarial training (Ganin et al., 2016): a domain discriminator behind a
gradient reversal layer makes the features domain-invariant."""

from tlops.training.strategies._adapt import strategy
from tlops.training.strategies.base import register

STRATEGY = register(strategy("dann", "domain-adversarial training with a gradient reversal layer (DANN)", 100))
