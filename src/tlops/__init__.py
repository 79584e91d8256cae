"""tlops: transfer-learning pipelines from a pretrained source model to a registered target model."""

__version__ = "0.1.0"
