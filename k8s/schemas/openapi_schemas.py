"""Vendor a custom resource's schema from a project's OpenAPI spec (for CRDs that ship none).

Katib's Experiment CRD (``manifests/v1beta1/components/crd/experiment.yaml``) declares only
``x-kubernetes-preserve-unknown-fields: true``: the API server accepts any Experiment and
Katib's admission webhook rejects bad ones on the cluster. The typed schema lives in Katib's
OpenAPI spec generated from its Go types (``api/openapi-spec/swagger.json``, what the Katib
Python SDK is generated from). This script resolves every ``$ref`` reachable from one kind into
a single self-contained schema (descriptions removed), in the same document format as
``crd_schemas.py vendor`` writes, so ``crd_schemas.py validate`` checks it strictly:

    git -C katib show <commit>:api/openapi-spec/swagger.json > katib-swagger.json
    python k8s/schemas/openapi_schemas.py katib-swagger.json v1beta1.Experiment \
        --group kubeflow.org --version v1beta1 --kind Experiment \
        --source "kubeflow/katib@<commit>:api/openapi-spec/swagger.json" --release v0.19.0 \
        > k8s/schemas/kubeflow.org_experiments.v1beta1.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def _resolve(node: Any, defs: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """Inline every ``$ref`` (``allOf: [{$ref}]`` wrappers too); drop descriptions and defaults
    (defaults say what the server fills in, they validate nothing)."""
    if isinstance(node, list):
        return [_resolve(v, defs, stack) for v in node]
    if not isinstance(node, dict):
        return node
    if "allOf" in node and len(node["allOf"]) == 1 and set(node["allOf"][0]) == {"$ref"}:
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **node["allOf"][0]}
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in stack:
            raise SystemExit(f"recursive schema at {' -> '.join((*stack, name))}: cannot inline")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**_resolve(defs[name], defs, (*stack, name)), **_resolve(rest, defs, stack)}
    out = {k: _resolve(v, defs, stack) for k, v in node.items() if k not in ("description", "default", "properties")}
    if isinstance(node.get("properties"), dict):  # property names (a field may be called "description")
        out["properties"] = {k: _resolve(v, defs, stack) for k, v in node["properties"].items()}
    return out


def vendor(spec_path: Path, name: str, group: str, version: str, kind: str, source: str, release: str) -> dict:
    raw = spec_path.read_bytes()
    spec = json.loads(raw)
    defs = spec.get("definitions") or spec["components"]["schemas"]
    schema = _resolve(defs[name], defs, (name,))
    schema["properties"].pop("status", None)  # written by the controller, never by a user
    return {
        "source": source,
        "release": release,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "group": group,
        "version": version,
        "kind": kind,
        "openAPIV3Schema": schema,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", type=Path, help="OpenAPI v2 or v3 JSON")
    ap.add_argument("name", help="the schema's name in the spec, e.g. v1beta1.Experiment")
    for opt in ("--group", "--version", "--kind", "--source", "--release"):
        ap.add_argument(opt, required=True)
    a = ap.parse_args(argv)
    doc = vendor(a.spec, a.name, a.group, a.version, a.kind, a.source, a.release)
    json.dump(doc, sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
