"""Shift monitoring: a reference stored with each registered model and ``tlops monitor``."""
