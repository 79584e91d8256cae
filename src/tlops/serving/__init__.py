"""Serving: the model contract, the registered model's files, ``tlops serve`` and ``tlops predict``."""
