"""Load a registered model by ``NAME@ALIAS`` (or ``NAME/VERSION``), knowing which version answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tlops.errors import ModelError


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None
    version: str

    @property
    def identity(self) -> dict[str, Any]:
        return {"model_name": self.name, "model_version": self.version, "model_alias": self.alias}


def resolve(ref: str) -> ModelRef:
    """``NAME@ALIAS`` -> the version the alias points at now; ``NAME/VERSION`` as given."""
    from tlops.tracking import registry

    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = registry.get_alias(name, alias)
        if mv is None:
            c = registry.client()
            known = sorted({a for v in registry.versions(name) for a in c.get_model_version(name, v.version).aliases})
            raise ModelError(
                f"{ref}: no version of '{name}' holds alias '{alias}'"
                + (f"; aliases in use: {', '.join(known)}" if known else f" ('{name}' has no aliased versions)")
            )
        return ModelRef(name, alias, str(mv.version))
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return ModelRef(name, None, version)
    raise ModelError(f"model '{ref}': give NAME@ALIAS (e.g. {ref}@champion) or NAME/VERSION")


def load(ref: ModelRef) -> Any:
    """The model of ``ref`` (a :class:`~tlops.tracking.pyfunc.TlopsClassifier`: ``.clf``,
    ``.contract``, ``.predict``), with its identity (every output row names it).

    The safe path, used by every tlops consumer: the version's files are downloaded and checked
    against the integrity manifest recorded at registration (:mod:`tlops.tracking.integrity`),
    then loaded by the installed tlops package (safetensors weights, JSON config). Nothing from
    the artifact store is executed, unlike ``mlflow.pyfunc.load_model``, which runs the stored
    ``pyfunc_model.py`` (docs/security.md, "Loading registered models").
    """
    from tlops.tracking.integrity import verified_download
    from tlops.tracking.pyfunc import TlopsClassifier

    with verified_download(ref.name, ref.version) as local:
        return TlopsClassifier.from_model_dir(local, ref.identity)
