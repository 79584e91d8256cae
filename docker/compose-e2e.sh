#!/usr/bin/env bash
# End-to-end check of the containerised pipelines (`make compose-e2e`):
#
#   1. docker/offline-base.sh  -- docker engine, compose v2, dockerd, tlops-base:bookworm
#   2. docker/build-image.sh   -- tlops:<version> (layer cache: quick when nothing changed)
#   3. `tlops export compose`  -- the compose file generated from the DAG
#   4. the source pipeline (configs/digits_source.yaml), then the target pipeline
#      (configs/digits_target.yaml, source model mlflow:models:/digits-source@champion from the
#      compose MLflow server), each as `docker compose up ... summary`
#   5. the registry, asked from the host as the reader: no credentials is 401; digits-source has a
#      version with alias champion, moved by the reviewer (the `promote` service: the steps log in
#      as the pipeline, which may not), digits-target one with alias challenger
#   6. the `serve` service (tlops serve $TLOPS_SERVE_MODEL, default digits-source@champion: the
#      target's version is only challenger) started after the pipelines, asked from the host on
#      loopback: GET /v2/health/ready, then one POST /v2/models/<name>/infer with two digits
#   7. a summary; containers and the compose network are removed (the image stays).
#
# Authentication: the compose MLflow runs --app-name tlops-auth; random passwords for the admin,
# pipeline, reviewer and reader users go to $TLOPS_E2E_DIR/.env (mode 600), which compose reads.
#
# Repeatable: every run starts from an empty artifacts dir + MLflow store ($TLOPS_E2E_DIR),
# unless TLOPS_E2E_KEEP=1 (then versions go up with each run).  Needs root the first time
# (apt, dockerd, debootstrap).  Output is also written to $TLOPS_E2E_LOG.
#
# Env: TLOPS_E2E_DIR (default .tlops/compose-e2e), TLOPS_E2E_LOG (/tmp/tlops-compose-e2e.log),
#      TLOPS_E2E_KEEP, TLOPS_E2E_HOST_NETWORK=1 (generate with --host-network),
#      TLOPS_MLFLOW_PORT (host port of the MLflow server; default: a free one),
#      TLOPS_SERVE_PORT (host port of the serve endpoint; default: a free one),
#      TLOPS_SERVE_MODEL (what the serve service serves; default digits-source@champion),
#      BASE_IMAGE / IMAGE_NAME (passed on to build-image.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
LOG=${TLOPS_E2E_LOG:-/tmp/tlops-compose-e2e.log}
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

say() { printf '[compose-e2e] %s\n' "$*"; }
die() { printf '[compose-e2e] ERROR: %s\n' "$*"; exit 1; }
t_start=$(date +%s)

TLOPS_BIN=${TLOPS_BIN:-$ROOT/.venv/bin/tlops}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$TLOPS_BIN" ] || die "$TLOPS_BIN missing: run 'make install' first"

# --- 1 + 2: engine, base image, tlops image --------------------------------------------------
say "== docker/offline-base.sh"
bash docker/offline-base.sh
say "== docker/build-image.sh"
t=$(date +%s)
bash docker/build-image.sh
build_secs=$(( $(date +%s) - t ))

DOCKER=${DOCKER:-docker}
compose_cli() { "$DOCKER" compose "$@"; }
VERSION=$(sed -nE 's/^__version__ *= *["'\'']([^"'\'']+)["'\''].*/\1/p' src/tlops/__init__.py | head -1)
export TLOPS_IMAGE="${IMAGE_NAME:-tlops}:$VERSION"
image_size=$("$DOCKER" image inspect -f '{{.Size}}' "$TLOPS_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')
TLOPS_GIT_COMMIT=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$TLOPS_IMAGE")
export TLOPS_GIT_COMMIT

# --- 3: compose file + run environment --------------------------------------------------------
WORK=${TLOPS_E2E_DIR:-$ROOT/.tlops/compose-e2e}
COMPOSE_FILE_PATH=$WORK/compose.yaml
PROJECT=tlops-e2e
ART=$WORK/artifacts
if [ "$(id -u)" = 0 ]; then
    export TLOPS_UID=${TLOPS_UID:-1000} TLOPS_GID=${TLOPS_GID:-1000}   # the image's user
else
    export TLOPS_UID=${TLOPS_UID:-$(id -u)} TLOPS_GID=${TLOPS_GID:-$(id -g)}
fi
export TLOPS_ARTIFACTS=$ART
if [ -z "${TLOPS_MLFLOW_PORT:-}" ]; then
    TLOPS_MLFLOW_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export TLOPS_MLFLOW_PORT
if [ -z "${TLOPS_SERVE_PORT:-}" ]; then
    TLOPS_SERVE_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export TLOPS_SERVE_PORT TLOPS_SERVE_MODEL=${TLOPS_SERVE_MODEL:-digits-source@champion}
SERVE_URL="http://127.0.0.1:$TLOPS_SERVE_PORT"   # published on loopback, or bound there with host networking
host_net_args=()
MLFLOW_URL="http://127.0.0.1:$TLOPS_MLFLOW_PORT"
if [ "${TLOPS_E2E_HOST_NETWORK:-0}" = 1 ]; then
    host_net_args=(--host-network)
    MLFLOW_URL="http://127.0.0.1:5000"   # the server's own port on the host network
fi

dc() { compose_cli --ansi never -p "$PROJECT" -f "$COMPOSE_FILE_PATH" "$@"; }

mkdir -p "$WORK"
# leftovers of an interrupted run (containers, network) go first
if [ -f "$COMPOSE_FILE_PATH" ]; then
    TLOPS_CONFIG=/dev/null TLOPS_RUN_ID=none dc down --remove-orphans >/dev/null 2>&1 || true
fi
if [ "${TLOPS_E2E_KEEP:-0}" != 1 ]; then rm -rf "$ART"; fi
mkdir -p "$ART"
if [ "$(id -u)" = 0 ]; then chown "$TLOPS_UID:$TLOPS_GID" "$ART"; fi

# credentials: a private .env next to the compose file (compose reads it; never in git, never in a
# URL); fresh random passwords unless one is already there (TLOPS_E2E_KEEP=1 reuses the users)
ENV_FILE=$WORK/.env
if [ "${TLOPS_E2E_KEEP:-0}" != 1 ] || [ ! -s "$ENV_FILE" ]; then
    (umask 077; python3 - >"$ENV_FILE" <<'EOF'
import secrets
for var in ("ADMIN", "PIPELINE", "REVIEWER", "READER"):
    print(f"TLOPS_MLFLOW_{var}_PASSWORD={secrets.token_hex(16)}")
print(f"TLOPS_MLFLOW_SECRET_KEY={secrets.token_hex(24)}")
EOF
    )
fi
env_value() { sed -n "s/^$1=//p" "$ENV_FILE"; }

say "== tlops export compose ${host_net_args[*]:-}"
"$TLOPS_BIN" export compose --out "$COMPOSE_FILE_PATH" "${host_net_args[@]}"
services=$(TLOPS_CONFIG=/dev/null TLOPS_RUN_ID=x compose_cli -p "$PROJECT" -f "$COMPOSE_FILE_PATH" config --services | xargs)
say "compose file: $COMPOSE_FILE_PATH; services: $services"
say "image $TLOPS_IMAGE ($image_size), artifacts $ART (uid $TLOPS_UID), MLflow $MLFLOW_URL"

cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        say "FAILED (rc $rc); container states:"
        TLOPS_CONFIG=/dev/null TLOPS_RUN_ID=x dc ps -a 2>/dev/null || true
        say "last MLflow server lines:"
        TLOPS_CONFIG=/dev/null TLOPS_RUN_ID=x dc logs --no-log-prefix --tail 20 mlflow 2>/dev/null || true
    fi
    say "removing the containers and network of project $PROJECT (the image stays)"
    TLOPS_CONFIG=/dev/null TLOPS_RUN_ID=x dc down --remove-orphans >/dev/null 2>&1 || true
    say "log: $LOG"
}
trap cleanup EXIT

# --- 4: the pipelines ------------------------------------------------------------------------
declare -A wall
run_pipeline() {  # <label> <config>
    local label=$1 cfg=$2 t0 rc
    export TLOPS_CONFIG=$ROOT/$cfg
    export TLOPS_RUN_ID="$label-$(date +%Y%m%d-%H%M%S)"
    say "== $label pipeline: $cfg, run id $TLOPS_RUN_ID"
    t0=$(date +%s)
    set +e
    # summary and every step it depends on, logs attached (the server's too noisy: not attached);
    # returns when summary exits, with its exit code, or at once when a step fails
    dc up --pull never --attach-dependencies --no-attach mlflow --exit-code-from summary summary
    rc=$?
    set -e
    wall[$label]=$(( $(date +%s) - t0 ))
    say "$label pipeline: rc $rc, wall ${wall[$label]}s"
    [ "$rc" = 0 ] || die "$label pipeline failed"
    # every step container exited 0
    dc ps -a --format '{{.Service}} {{.State}} {{.ExitCode}}' 2>/dev/null | sed 's/^/    /' || true
}
run_pipeline source configs/digits_source.yaml
run_pipeline target configs/digits_target.yaml

# --- 5: the registry ---------------------------------------------------------------------------
say "== model registry at $MLFLOW_URL"
# the server stays up after `up ... summary`; make sure (e.g. after a restart) it answers
dc up -d --pull never --wait mlflow >/dev/null 2>&1 || true
registry=$(MLFLOW_TRACKING_URI=$MLFLOW_URL MLFLOW_TRACKING_USERNAME=reader \
    MLFLOW_TRACKING_PASSWORD=$(env_value TLOPS_MLFLOW_READER_PASSWORD) "$PY" - <<'EOF'
import os, sys, urllib.error, urllib.request
from mlflow import MlflowClient

c = MlflowClient()
ok = True
# authentication is on: no credentials, no registry
try:
    urllib.request.urlopen(f"{os.environ['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/registered-models/search", timeout=10)
    ok = False
    print("MISSING authentication: the registry answered a request without credentials")
except urllib.error.HTTPError as e:
    print(f"OK no credentials -> HTTP {e.code}")
    ok = ok and e.code == 401
promoted = c.get_model_version_by_alias("digits-source", "champion").tags.get("tlops.promoted", "")
print(f"{'OK' if promoted.startswith('reviewer ') else 'MISSING'} digits-source champion promoted by: {promoted}")
ok = ok and promoted.startswith("reviewer ")
for name, alias in (("digits-source", "champion"), ("digits-target", "challenger")):
    versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    for v in versions:
        full = c.get_model_version(name, v.version)
        print(f"  {name} v{v.version}: aliases={sorted(full.aliases)} run={v.run_id} status={v.status}")
    try:
        mv = c.get_model_version_by_alias(name, alias)
        print(f"OK {name}@{alias} -> version {mv.version}")
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"MISSING {name}@{alias}: {type(e).__name__}: {e}")
sys.exit(0 if ok else 1)
EOF
) || { echo "$registry"; die "registered models are not as expected"; }
echo "$registry"

# --- 6: the serving endpoint -------------------------------------------------------------------
say "== serve $TLOPS_SERVE_MODEL at $SERVE_URL"
# --no-deps: the steps it depends on have just run; --wait: until /v2/health/ready answers
dc up -d --no-deps --pull never --wait serve || {
    dc logs --no-log-prefix --tail 30 serve 2>/dev/null || true
    die "the serve service did not become ready"
}
served=$(SERVE_URL=$SERVE_URL MODEL=${TLOPS_SERVE_MODEL%%[@/]*} "$PY" - <<'EOF'
import json, os, sys, urllib.request

import numpy as np
from sklearn.datasets import load_digits

url, name = os.environ["SERVE_URL"], os.environ["MODEL"]
with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as r:
    print(f"OK GET /v2/health/ready -> {r.status}")
d = load_digits()
x = (d.images[:2] / 16 * 255).round().astype(np.uint8)  # two digits, 0-255 like ingest's images
body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
req = urllib.request.Request(
    f"{url}/v2/models/{name}/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
)
with urllib.request.urlopen(req, timeout=30) as r:
    out = json.load(r)
outputs = {o["name"]: o["data"] for o in out["outputs"]}
print(f"OK POST /v2/models/{name}/infer -> model version {out.get('model_version')}, outputs {sorted(outputs)}")
print(f"   answers {outputs.get('label')} for true digits {d.target[:2].tolist()}")
sys.exit(0 if all(len(v) >= 2 for v in outputs.values()) and outputs else 1)
EOF
) || { echo "$served"; die "the serve endpoint did not answer as expected"; }
echo "$served"

# --- 7: summary ------------------------------------------------------------------------------
say "================ summary ================"
say "image:            $TLOPS_IMAGE ($image_size), build-image.sh ${build_secs}s"
say "source pipeline:  ${wall[source]}s wall"
say "target pipeline:  ${wall[target]}s wall"
echo "$registry" | grep -E '^(OK|MISSING) ' | sed 's/^/[compose-e2e] registry:         /'
echo "$served" | grep -E '^OK ' | sed 's/^/[compose-e2e] serve:            /'
say "total:            $(( $(date +%s) - t_start ))s"
say "PASSED"
