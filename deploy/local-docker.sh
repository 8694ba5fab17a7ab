#!/usr/bin/env bash
# A Docker engine for machines without Docker Hub (e.g. this project's dev/CI machines: root,
# no internet except the package registries, a TLS-intercepting CA only the host trusts).
#
#   deploy/local-docker.sh test     # everything below, then `make deploy-test`
#   deploy/local-docker.sh setup    # install + start + base + stage (idempotent)
#   deploy/local-docker.sh env      # the variables `make deploy-test` / compose need here
#   deploy/local-docker.sh stop     # stop the dockerd this script started
#
# Steps (each skipped when already done):
#   install  apt-get install docker.io docker-compose debootstrap (dockerd 20.10, Compose v1.29)
#   start    dockerd --storage-driver=vfs --iptables=false --ip-masq=false --bridge=none
#            (log and pid under $LOCAL_DOCKER_STATE, default /var/tmp/softspec-docker)
#   base     a python3 base image made locally, since none can be pulled:
#            debootstrap --variant=minbase bookworm + python3, python3-venv, ca-certificates,
#            then `docker import` as $LOCAL_BASE_IMAGE (default softspec-base:bookworm)
#   prom     a Prometheus image from Debian's prometheus package on that base, as
#            $LOCAL_PROMETHEUS_IMAGE (default softspec-prometheus:bookworm): prom/prometheus
#            cannot be pulled either; compose's monitoring profile takes it via PROMETHEUS_IMAGE
#   stage    deploy/local/ (git-ignored): the host's CA bundle (pip in the build trusts it)
#            and the local CPU torch wheel from pip's find-links (the registry's torch is
#            the multi-GB CUDA build)
# Machines with Docker Hub need none of this: `make deploy-test` uses python:3.11-slim.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
STATE="${LOCAL_DOCKER_STATE:-/var/tmp/softspec-docker}"
BASE="${LOCAL_BASE_IMAGE:-softspec-base:bookworm}"
PROM="${LOCAL_PROMETHEUS_IMAGE:-softspec-prometheus:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
LOCAL="$HERE/local"

log() { printf 'local-docker: %s\n' "$*" >&2; }

do_install() {
    if command -v dockerd >/dev/null && command -v docker-compose >/dev/null \
        && command -v debootstrap >/dev/null; then
        return
    fi
    log "installing docker.io docker-compose debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap
}

do_start() {
    if docker info >/dev/null 2>&1; then
        log "a Docker engine is running"
        return
    fi
    mkdir -p "$STATE"
    log "starting dockerd (log $STATE/dockerd.log)"
    nohup dockerd --storage-driver=vfs --iptables=false --ip-masq=false --bridge=none \
        --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    log "dockerd did not come up in 60 s; see $STATE/dockerd.log"
    tail -n 20 "$STATE/dockerd.log" >&2
    exit 1
}

do_base() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        log "base image $BASE exists"
        return
    fi
    local root
    root="$(mktemp -d /var/tmp/softspec-rootfs.XXXXXX)"
    log "debootstrap bookworm into $root (about 2 minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$root"
    log "imported $BASE"
}

do_prom() {
    if docker image inspect "$PROM" >/dev/null 2>&1; then
        log "Prometheus image $PROM exists"
        return
    fi
    log "building $PROM from Debian's prometheus package"
    # the official image's layout: the binary as entrypoint, config and data paths as below
    printf '%s\n' \
        "FROM $BASE" \
        "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus" \
        'ENTRYPOINT ["/usr/bin/prometheus"]' \
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
        | docker build --network host -q -t "$PROM" - >/dev/null
    log "built $PROM"
}

find_links() {
    # pip's find-links from its config and environment (space-separated directories)
    { pip config list 2>/dev/null || true; } | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"
    printf '%s\n' "${PIP_FIND_LINKS:-}"
}

do_stage() {
    mkdir -p "$LOCAL"
    if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
        cp /etc/ssl/certs/ca-certificates.crt "$LOCAL/host-ca-certificates.crt"
    fi
    if ! ls "$LOCAL"/torch-*.whl >/dev/null 2>&1; then
        local dir wheel
        for dir in $(find_links); do
            wheel="$(ls "${dir#file://}"/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)"
            if [[ -n "$wheel" ]]; then
                cp "$wheel" "$LOCAL/"
                log "staged $(basename "$wheel")"
                break
            fi
        done
    fi
    ls "$LOCAL"/torch-*.whl >/dev/null 2>&1 \
        || log "no local CPU torch wheel found: the build falls back to TORCH_INDEX_URL"
}

do_env() {
    echo "export BASE_IMAGE=$BASE"
    # No pytorch.org here: torch comes from deploy/local/ (staged above).
    echo "export TORCH_INDEX_URL="
    echo "export DOCKER_BUILD_NETWORK=host"
    echo "export PROMETHEUS_IMAGE=$PROM"
    # Compose v1 waits 60 s per engine call; a container of the full image takes longer on vfs
    echo "export COMPOSE_HTTP_TIMEOUT=600"
}

do_stop() {
    if [[ -s "$STATE/dockerd.pid" ]]; then
        local pid
        pid="$(cat "$STATE/dockerd.pid")"
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping dockerd (pid $pid)"
            kill "$pid"
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
            log "dockerd (pid $pid) still running"
            return 1
        fi
    fi
    log "no dockerd started by this script is running"
}

case "${1:-}" in
    install) do_install ;;
    start) do_install; do_start ;;
    base) do_base ;;
    prom) do_prom ;;
    stage) do_stage ;;
    setup) do_install; do_start; do_base; do_prom; do_stage ;;
    env) do_env ;;
    test)
        do_install; do_start; do_base; do_prom; do_stage
        eval "$(do_env)"
        cd "$REPO"
        nice -n 10 make deploy-test
        ;;
    stop) do_stop ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
