#!/usr/bin/env bash
# Offline check of the Kubernetes manifests: render each kustomization with `kubectl
# kustomize` and validate every object against the Kubernetes OpenAPI schemas bundled with
# kubernetes-validate, in strict mode (unknown fields are errors). No cluster, no network.
#
#   bash k8s/validate.sh                 # k8s/base, every k8s/overlays/*, the secrets template
#   bash k8s/validate.sh DIR [DIR ...]   # only these kustomization directories
#
# Fails (exit 1) when a kustomization does not render, when any object is invalid or has no
# schema (a typo in kind/apiVersion would otherwise be skipped with a warning), or when a
# rendered Secret carries anything but placeholder values.
#
# Environment:
#   K8S_VERSIONS          Kubernetes versions to validate against (default "1.31.0 1.37.0":
#                         the oldest still-supported minor release and the newest schemas
#                         shipped by kubernetes-validate 1.37)
#   KUBECTL               kubectl binary (default: kubectl on PATH)
#   KUBERNETES_VALIDATE   kubernetes-validate binary (default: .venv/bin/ of this repo if
#                         present, else PATH)
#   REQUIRE_DIGESTS=1     also fail when a container image is not referenced by digest
#                         (name@sha256:...): the check for a production overlay, where a tag
#                         could be moved to another image under a running deployment
set -euo pipefail

K8S_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$K8S_DIR")"
K8S_VERSIONS="${K8S_VERSIONS:-1.31.0 1.37.0}"
KUBECTL="${KUBECTL:-kubectl}"

if [[ -n "${KUBERNETES_VALIDATE:-}" ]]; then
  KV="$KUBERNETES_VALIDATE"
elif [[ -x "$REPO/.venv/bin/kubernetes-validate" ]]; then
  KV="$REPO/.venv/bin/kubernetes-validate"
else
  KV="$(command -v kubernetes-validate || true)"
fi
[[ -n "$KV" && -x "$KV" ]] || { echo "error: kubernetes-validate not found (pip install -e '.[dev]')" >&2; exit 2; }
command -v "$KUBECTL" >/dev/null || { echo "error: $KUBECTL not found (needs kubectl >= 1.27 for kustomize v5)" >&2; exit 2; }

# The Secret check runs on kubernetes-validate's own interpreter (it has PyYAML by definition).
PY="$(sed -n '1s/^#![[:space:]]*//p' "$KV" | awk '{print $1}')"
[[ -n "$PY" && -x "$PY" ]] || PY="$(command -v python3)"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Prints the number of objects in a multi-document YAML file; fails if a Secret has data that
# is not a placeholder (empty, CHANGE_ME/REPLACE_ME..., or <angle brackets>), and with
# REQUIRE_DIGESTS=1 if an image is not pinned by digest.
check_objects() {
  "$PY" - "$1" <<'PYEOF'
import base64, os, re, sys, yaml

PLACEHOLDER = re.compile(r"^(|(CHANGE|REPLACE)[_-]?ME\w*|<[^<>]*>)$", re.I)
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
bad = []
for d in docs:
    if d.get("kind") != "Secret":
        continue
    name = d.get("metadata", {}).get("name", "?")
    values = dict(d.get("stringData") or {})
    for k, v in (d.get("data") or {}).items():
        try:
            values[k] = base64.b64decode(str(v), validate=True).decode()
        except Exception:
            values[k] = "<undecodable>x"  # never a placeholder
    bad += [f"secret/{name}: key {k!r} holds a non-placeholder value"
            for k, v in values.items() if not PLACEHOLDER.match(str(v))]
if os.environ.get("REQUIRE_DIGESTS") == "1":
    def pods(d):
        spec = d.get("spec") or {}
        if d.get("kind") == "CronJob":
            spec = spec.get("jobTemplate", {}).get("spec", {})
        return [spec.get("template", {}).get("spec", {})] if "template" in spec else []
    for d in docs:
        for pod in pods(d):
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                if not re.search(r"@sha256:[0-9a-f]{64}$", c.get("image", "")):
                    bad.append(f"{d['kind'].lower()}/{d['metadata']['name']}: container {c['name']} image "
                               f"{c.get('image')!r} is not pinned by digest (REQUIRE_DIGESTS=1)")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(len(docs))
PYEOF
}

# validate LABEL FILE: every object must pass for every version in K8S_VERSIONS.
validate() {
  local label="$1" file="$2" n out rc passed problems v
  if ! n="$(check_objects "$file" 2>"$TMP/secrets.err")"; then
    sed 's/^/  /' "$TMP/secrets.err"
    echo "FAIL $label: rendered Secret(s) with real-looking data (secrets never come from git), or images not pinned by digest"
    return 1
  fi
  # Custom resources with a CRD schema vendored in k8s/schemas/ (KServe's InferenceService) are
  # checked against it; kubernetes-validate, which knows the built-in kinds only, gets the rest.
  local ncr
  if ! ncr="$("$PY" "$K8S_DIR/schemas/crd_schemas.py" validate "$file" "$TMP/core.yaml" 2>"$TMP/crs.err")"; then
    sed 's/^/  /' "$TMP/crs.err"
    echo "FAIL $label: custom resource(s) invalid against the CRD schema vendored in k8s/schemas/ (strict)"
    return 1
  fi
  file="$TMP/core.yaml"
  # One kubernetes-validate per version, in parallel (it reloads the schemas for every object).
  for v in $K8S_VERSIONS; do
    (rc=0; "$KV" --strict -k "$v" "$file" >"$TMP/kv-$v.out" 2>&1 || rc=$?; echo "$rc" >"$TMP/kv-$v.rc") &
  done
  wait
  for v in $K8S_VERSIONS; do
    rc="$(cat "$TMP/kv-$v.rc")"
    out="$(cat "$TMP/kv-$v.out")"
    passed="$(grep -c '^INFO .* passed for resource' <<<"$out" || true)"
    problems="$(grep -v '^INFO .* passed for resource' <<<"$out" || true)"
    if [[ $rc -ne 0 || "$passed" -ne "$((n - ncr))" || -n "$problems" ]]; then
      [[ -n "$problems" ]] && sed 's/^/  /' <<<"$problems"
      echo "FAIL $label: $passed/$((n - ncr)) objects valid against Kubernetes $v (strict)"
      return 1
    fi
  done
  local crs=""
  [[ "$ncr" -gt 0 ]] && crs=" ($ncr of them custom resources, against k8s/schemas/)"
  echo "ok   $label: $n objects valid against Kubernetes ${K8S_VERSIONS// /, } (strict)$crs"
}

targets=()
if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  targets=("$K8S_DIR/base")
  for d in "$K8S_DIR"/overlays/*/; do
    [[ -f "$d/kustomization.yaml" ]] && targets+=("${d%/}")
  done
fi

failed=0
for dir in "${targets[@]}"; do
  label="${dir#"$K8S_DIR"/}"
  out="$TMP/$(tr -c 'A-Za-z0-9._-' '_' <<<"$label" | sed 's/_*$//').yaml"
  if ! "$KUBECTL" kustomize "$dir" >"$out" 2>"$TMP/kustomize.err"; then
    sed 's/^/  /' "$TMP/kustomize.err"
    echo "FAIL $label: kubectl kustomize failed"
    failed=1
    continue
  fi
  validate "$label" "$out" || failed=1
done

# The Secret template is not part of any kustomization; keep it valid and placeholder-only.
if [[ $# -eq 0 && -f "$K8S_DIR/base/secrets.example.yaml" ]]; then
  validate "base/secrets.example.yaml" "$K8S_DIR/base/secrets.example.yaml" || failed=1
fi

if [[ $failed -ne 0 ]]; then
  echo "k8s manifests: INVALID" >&2
  exit 1
fi
echo "k8s manifests: all valid"
