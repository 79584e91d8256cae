"""Component functions for the tasks outside the DAG (batch-predict, monitor-and-adapt).

KFP ships a lightweight component as the source of its function, which the container runs after
``from kfp.dsl import *`` and ``from typing import *``. A function defined here would ship this
module's source with it; instead the source is generated from the argument list: a fixed body
that hands every argument to a function of the installed tlops, registered with ``linecache``
(where ``inspect.getsource`` finds it), the same on every machine.
"""

from __future__ import annotations

import linecache
import typing
from typing import Any


def source(name: str, args: tuple[tuple[str, str], ...], doc: str, module: str, target: str, returns: str = "") -> str:
    """``def name(args) -> returns: return module.target({arg: arg, ...})`` (no ``return`` without
    ``returns``: KFP refuses a value from a function that declares none)."""
    ret = f" -> {returns}" if returns else ""
    return (
        f"def {name}(\n"
        + "".join(f"    {n}: {a},\n" for n, a in args)
        + f"){ret}:\n"
        + f"    {doc!r}\n"
        + f"    from {module} import {target}\n\n"
        + f"    {'return ' if returns else ''}{target}({{\n"
        + "".join(f"        {n!r}: {n},\n" for n, _ in args)
        + "    })\n"
    )


def component_function(
    name: str, args: tuple[tuple[str, str], ...], doc: str, module: str, target: str, returns: str = ""
):
    """The function KFP turns into a component (``dsl.component(fn, ...)``)."""
    from kfp import dsl

    text = source(name, args, doc, module, target, returns)
    filename = f"<{module}.{name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": module, "NamedTuple": typing.NamedTuple}
    namespace.update({k: getattr(dsl, k) for k in ("Input", "Output", "Artifact", "Dataset", "Model")})
    exec(compile(text, filename, "exec", dont_inherit=True), namespace)  # the fixed source above
    return namespace[name]
