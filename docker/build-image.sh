#!/usr/bin/env bash
# Build the tlops runtime image from docker/Dockerfile: tags $IMAGE_NAME:<version> (version =
# __version__ of src/tlops/__init__.py) and $IMAGE_NAME:latest.
#
# The build runs with --network host so pip reaches the package index.  Local package sources
# of this machine's pip (local find-links folders and file:// extra indexes from `pip config` or
# PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL) are served read-only over http on 127.0.0.1 for the
# length of the build and passed as the standard PIP_* build args; remote ones are passed as
# they are.  pip's CA bundle (PIP_CERT / `pip config get global.cert`, else the system bundle)
# goes in as the BuildKit secret `pipcert`.  The Dockerfile knows none of these host paths.
#
# Env: BASE_IMAGE (default tlops-base:bookworm, from docker/offline-base.sh; e.g.
#      nvidia/cuda:13.0.1-base-ubuntu22.04 on a machine that reaches Docker Hub),
#      IMAGE_NAME (tlops), GIT_COMMIT (default: HEAD of this checkout), SOURCE_URL,
#      BUILD_LOG (full build output; default /tmp/tlops-image-build.log), DOCKER (docker CLI),
#      TLOPS_SERVE_LOCAL_PIP=0 to pass no local package sources, TLOPS_PIP_SERVE_PORT (47653;
#      keep it fixed: the URLs are part of the layer cache key).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BASE_IMAGE=${BASE_IMAGE:-tlops-base:bookworm}
IMAGE_NAME=${IMAGE_NAME:-tlops}
BUILD_LOG=${BUILD_LOG:-/tmp/tlops-image-build.log}

say() { printf '[build-image] %s\n' "$*"; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

VERSION=$(sed -nE 's/^__version__ *= *["'\'']([^"'\'']+)["'\''].*/\1/p' src/tlops/__init__.py | head -1)
[ -n "$VERSION" ] || die "no __version__ in src/tlops/__init__.py"

# HEAD of this checkout, read from .git directly (works without a git binary); git as fallback
git_head() {
    local gd=.git common head ref
    if [ -f .git ]; then gd=$(sed -n 's/^gitdir: //p' .git); fi
    [ -f "$gd/HEAD" ] || return 1
    common=$gd
    if [ -f "$gd/commondir" ]; then common="$gd/$(cat "$gd/commondir")"; fi
    head=$(cat "$gd/HEAD")
    case $head in
        "ref: "*)
            ref=${head#ref: }
            if [ -f "$gd/$ref" ]; then cat "$gd/$ref"
            elif [ -f "$common/$ref" ]; then cat "$common/$ref"
            elif [ -f "$common/packed-refs" ]; then awk -v r="$ref" '$2 == r {print $1; exit}' "$common/packed-refs"
            fi ;;
        *) echo "$head" ;;
    esac
}
GIT_COMMIT=${GIT_COMMIT:-$(git_head 2>/dev/null || true)}
if [ -z "$GIT_COMMIT" ] && command -v git >/dev/null; then GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || true); fi
GIT_COMMIT=${GIT_COMMIT:-unknown}
if [ -z "${SOURCE_URL:-}" ] && [ -f .git/config ]; then
    SOURCE_URL=$(awk '/^\[remote "origin"\]/{o=1; next} /^\[/{o=0} o && $1 == "url" {print $3; exit}' .git/config)
fi
SOURCE_URL=${SOURCE_URL:-}

# --- a docker CLI that can run a BuildKit build (RUN --mount, --secret) ----------------------
# buildx when present; else a CLI older than 23.0, which still has BuildKit built in (docker.io
# 20.10 from Debian); newer CLIs without the buildx plugin cannot.
pick_docker() {
    local c v
    for c in ${DOCKER:-} docker /usr/bin/docker; do
        command -v "$c" >/dev/null || continue
        if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return 0; fi
        v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
        if [[ $v =~ ^([0-9]+)\. ]] && [ "${BASH_REMATCH[1]}" -lt 23 ]; then echo "$c"; return 0; fi
    done
    return 1
}
DOCKER_CLI=$(pick_docker) || die "no docker CLI with BuildKit (install the buildx plugin, or docker.io 20.10)"
"$DOCKER_CLI" info >/dev/null 2>&1 || die "dockerd is not reachable: run docker/offline-base.sh (as root) first"
"$DOCKER_CLI" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || say "base image $BASE_IMAGE is not local; the build will try to pull it"

# --- pip's package sources -------------------------------------------------------------------
pip_cfg() { python3 -m pip config get "$1" 2>/dev/null || true; }
uniq_words() { awk '{for (i = 1; i <= NF; i++) if (!seen[$i]++) printf "%s ", $i}'; }
find_links=$(echo "${PIP_FIND_LINKS:-} $(pip_cfg global.find-links) $(pip_cfg install.find-links)" | uniq_words)
extra_index=$(echo "${PIP_EXTRA_INDEX_URL:-} $(pip_cfg global.extra-index-url) $(pip_cfg install.extra-index-url)" | uniq_words)
index_url=${PIP_INDEX_URL:-$(pip_cfg global.index-url)}
ca=${PIP_CERT:-$(pip_cfg global.cert)}
if [ -z "$ca" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then ca=/etc/ssl/certs/ca-certificates.crt; fi

srv_dir="" srv_pid="" port=""
cleanup() {
    if [ -n "$srv_pid" ]; then kill "$srv_pid" 2>/dev/null || true; wait "$srv_pid" 2>/dev/null || true; fi
    if [ -n "$srv_dir" ]; then rm -rf "$srv_dir" "$srv_dir.log"; fi
}
trap cleanup EXIT
n=0
# local folder/file:// URL -> URL on the local http server (the parent of an index's simple/
# folder is served, so relative links to ../../files/ keep working); remote URLs stay as they are
to_url() {  # <kind: fl|ix> <location>; sets URL (no subshell: it records what to serve)
    local loc=$2 dir name
    URL=""
    case $loc in
        http://*|https://*) URL=$loc; return ;;
        file://*) dir=${loc#file://} ;;
        *) dir=$loc ;;
    esac
    dir=${dir%/}
    [ -d "$dir" ] || { say "skipping $loc (not a folder)"; return; }
    [ "${TLOPS_SERVE_LOCAL_PIP:-1}" != 0 ] || return 0
    if [ -z "$srv_dir" ]; then
        srv_dir=$(mktemp -d /tmp/tlops-pip-serve.XXXXXX)
    fi
    n=$((n + 1))
    name="$1$n"
    if [ "$1" = ix ]; then
        ln -s "$(dirname "$dir")" "$srv_dir/$name"
        URL="http://127.0.0.1:PORT/$name/$(basename "$dir")/"
    else
        ln -s "$dir" "$srv_dir/$name"
        URL="http://127.0.0.1:PORT/$name/"
    fi
}
fl_urls="" ix_urls="" idx_url=""
for l in $find_links; do to_url fl "$l"; fl_urls+="$URL "; done
for l in $extra_index; do to_url ix "$l"; ix_urls+="$URL "; done
if [ -n "$index_url" ]; then to_url ix "$index_url"; idx_url=$URL; fi
if [ -n "$srv_dir" ]; then
    # a fixed port: the URLs are build-arg values, part of the layer cache key of pip's RUN
    port=$(python3 - "${TLOPS_PIP_SERVE_PORT:-47653}" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server: TIME_WAIT is no conflict
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))  # taken: any free one (the dependency layer is then rebuilt)
print(s.getsockname()[1])
EOF
)
    python3 -m http.server --bind 127.0.0.1 --directory "$srv_dir" "$port" >"$srv_dir.log" 2>&1 &
    srv_pid=$!
    for _ in $(seq 1 50); do
        python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
        sleep 0.1
    done
    say "serving local pip sources on http://127.0.0.1:$port/ (pid $srv_pid):"
    for l in "$srv_dir"/*; do say "  /$(basename "$l")/ -> $(readlink "$l")"; done
fi
fl_urls=$(echo "${fl_urls//PORT/$port}" | xargs)
ix_urls=$(echo "${ix_urls//PORT/$port}" | xargs)
idx_url=${idx_url//PORT/$port}

args=(
    --network host
    -f docker/Dockerfile
    -t "$IMAGE_NAME:$VERSION" -t "$IMAGE_NAME:latest"
    --build-arg "BASE_IMAGE=$BASE_IMAGE"
    --build-arg "VERSION=$VERSION"
    --build-arg "GIT_COMMIT=$GIT_COMMIT"
    --build-arg "SOURCE_URL=$SOURCE_URL"
)
[ -z "$fl_urls" ] || args+=(--build-arg "PIP_FIND_LINKS=$fl_urls")
[ -z "$ix_urls" ] || args+=(--build-arg "PIP_EXTRA_INDEX_URL=$ix_urls")
[ -z "$idx_url" ] || args+=(--build-arg "PIP_INDEX_URL=$idx_url")
[ -z "$port" ] || args+=(--build-arg "PIP_TRUSTED_HOST=127.0.0.1")
if [ -n "$ca" ] && [ -f "$ca" ]; then args+=(--secret "id=pipcert,src=$ca"); fi

say "docker: $DOCKER_CLI ($("$DOCKER_CLI" version --format 'client {{.Client.Version}}, server {{.Server.Version}}'))"
say "image: $IMAGE_NAME:$VERSION (+ :latest) from BASE_IMAGE=$BASE_IMAGE, commit $GIT_COMMIT"
[ -z "$fl_urls" ] || say "PIP_FIND_LINKS=$fl_urls"
[ -z "$ix_urls" ] || say "PIP_EXTRA_INDEX_URL=$ix_urls"
[ -z "$ca" ] || say "pip CA bundle (BuildKit secret pipcert): $ca"
say "full build log: $BUILD_LOG"

old_id=$("$DOCKER_CLI" image inspect -f '{{.Id}}' "$IMAGE_NAME:$VERSION" 2>/dev/null || true)
t0=$(date +%s)
set +e
DOCKER_BUILDKIT=1 "$DOCKER_CLI" build --progress plain "${args[@]}" "$ROOT" >"$BUILD_LOG" 2>&1
rc=$?
set -e
secs=$(( $(date +%s) - t0 ))
# the step lines, without pip's chatter
grep -E '^#[0-9]+ (\[|DONE|CACHED|ERROR|naming|exporting)' "$BUILD_LOG" | grep -vE '^#[0-9]+ \[internal\]' | sed 's/^/    /' || true
if [ "$rc" != 0 ]; then
    echo "----- last 60 lines of $BUILD_LOG -----" >&2
    tail -n 60 "$BUILD_LOG" >&2
    die "docker build failed (rc $rc) after ${secs}s"
fi
new_id=$("$DOCKER_CLI" image inspect -f '{{.Id}}' "$IMAGE_NAME:$VERSION")
# the image this build replaced, once untagged, is only disk space (~7 GB): remove it
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ] \
    && [ "$("$DOCKER_CLI" image inspect -f '{{len .RepoTags}}' "$old_id" 2>/dev/null)" = 0 ]; then
    "$DOCKER_CLI" image rm "$old_id" >/dev/null 2>&1 && say "removed the previous, now untagged image ${old_id:7:12}" || true
fi
size=$("$DOCKER_CLI" image inspect -f '{{.Size}}' "$IMAGE_NAME:$VERSION" | awk '{printf "%.2f GB", $1/1e9}')
say "built $IMAGE_NAME:$VERSION (${new_id:0:19}), size $size"
say "image build time: ${secs}s"
