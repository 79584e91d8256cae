"""The strategy registry: each strategy is one module in this package that registers a
:class:`Strategy` by name with what it needs (modalities, ``data.adapt_from``,
``source.candidates``) and its training function.

Everything that knows about strategies reads this registry: the config's allowed values and
its validation (``tlops validate``), the fine-tune step's dispatch, ``tlops strategies`` and the
generated docs/strategies.md. Adding a strategy is one new module here (plus its test): the
modules are found by name, so no list elsewhere needs an edit. Modules whose name starts with
``_`` hold code shared by several strategies.

Importing the registry is cheap (no torch): the training functions import what they need.
"""

from __future__ import annotations

import importlib
import pkgutil

from tlops.training.strategies.base import (
    MODALITIES,
    REGISTRY,
    Job,
    Probe,
    Strategy,
    Trained,
    for_modality,
    get,
    names,
    problems,
    register,
)

__all__ = [
    "MODALITIES",
    "REGISTRY",
    "Job",
    "Probe",
    "Strategy",
    "Trained",
    "for_modality",
    "get",
    "names",
    "problems",
    "register",
]


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    ordered = sorted(REGISTRY.values(), key=lambda s: (s.order, s.name))
    REGISTRY.clear()
    REGISTRY.update((s.name, s) for s in ordered)


_discover()
