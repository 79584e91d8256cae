"""Custom resources validated offline against CRD schemas vendored in this directory.

kubernetes-validate knows the built-in kinds only; a custom resource (KServe's InferenceService)
would be skipped with "no schema". Each ``*.json`` here holds one CRD version's
``openAPIV3Schema`` (descriptions removed) with where it came from:

    python k8s/schemas/crd_schemas.py vendor CRD.yaml VERSION --source "kserve/kserve@<commit>:<path>" \
        --release v0.20.0 > k8s/schemas/<group>_<plural>.<VERSION>.json
    python k8s/schemas/crd_schemas.py validate RENDERED.yaml REST.yaml

``validate`` checks every object whose apiVersion/kind has a vendored schema, strictly (a field
the schema does not declare is an error, as ``kubectl apply --validate=strict`` would report it,
unless the schema preserves unknown fields there), writes the other objects to REST.yaml for
kubernetes-validate, and prints how many objects it checked. Exit 1 on any invalid object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def vendor(crd_path: Path, version: str, source: str, release: str) -> dict[str, Any]:
    raw = crd_path.read_bytes()
    crd = yaml.safe_load(raw)
    spec = crd["spec"]
    found = [v for v in spec["versions"] if v["name"] == version]
    if not found:
        sys.exit(f"{crd_path}: no version {version} (has {[v['name'] for v in spec['versions']]})")
    return {
        "source": source,
        "release": release,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "group": spec["group"],
        "version": version,
        "kind": spec["names"]["kind"],
        "openAPIV3Schema": _strip(found[0]["schema"]["openAPIV3Schema"]),
    }


def _strict(node: Any) -> Any:
    """Closed objects: a declared ``properties`` map without additionalProperties/preserve-unknown is exhaustive."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the vendored document."""
    out = {}
    for p in sorted(HERE.glob("*.json")):
        doc = json.loads(p.read_text())
        doc["file"] = p.name
        out[(f"{doc['group']}/{doc['version']}", doc["kind"])] = doc
    return out


def validate(rendered: Path, rest: Path) -> int:
    import jsonschema

    known = schemas()
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    checked, others, errors = 0, [], []
    for d in docs:
        doc = known.get((d.get("apiVersion"), d.get("kind")))
        if doc is None:
            others.append(d)
            continue
        schema = _strict(doc["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server
        v = jsonschema.Draft7Validator(schema)
        where = f"{d['kind']}/{d.get('metadata', {}).get('name', '?')}"
        for e in sorted(v.iter_errors(d), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            errors.append(f"{where}: {path}: {e.message} ({doc['file']}, {doc['release']})")
        checked += 1
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return -1
    rest.write_text(yaml.safe_dump_all(others, sort_keys=False))
    return checked


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vendor", help="print the vendored JSON of one CRD version")
    v.add_argument("crd", type=Path)
    v.add_argument("version")
    v.add_argument("--source", required=True, help="repository@commit:path the CRD came from")
    v.add_argument("--release", required=True, help="the release that commit is")
    c = sub.add_parser("validate", help="validate the custom resources of a rendered file")
    c.add_argument("rendered", type=Path)
    c.add_argument("rest", type=Path, help="where to write the objects without a vendored schema")
    args = ap.parse_args(argv)
    if args.cmd == "vendor":
        doc = vendor(args.crd, args.version, args.source, args.release)
        json.dump(doc, sys.stdout, sort_keys=True, separators=(",", ":"))
        sys.stdout.write("\n")
        return
    n = validate(args.rendered, args.rest)
    if n < 0:
        sys.exit(1)
    print(n)


if __name__ == "__main__":
    main()
