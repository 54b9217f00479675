#!/usr/bin/env bash
# make image-test: build the image with podman and run it the way a pod does.   (5-10 min cold, ~3 warm)
#
# Self-contained for a Debian host with no container registry and no Docker daemon:
#   1. podman, runc and debootstrap from apt when missing; CONTAINERS_CONF=deploy/podman/containers.conf;
#   2. a Debian bookworm base image (debootstrap --variant=minbase + podman import), made once and
#      cached by its tag BASE_IMAGE;
#   3. `make image CONTAINER_ENGINE=podman`, with the host's CA bundle and a pip.conf mounted for the
#      build only (pip reaches PyPI through the host's TLS chain), and /opt/wheels (if present)
#      mounted for the build only, so pip takes the local CPU torch wheel;
#   4. deploy/image_test.py: runs the image read-only, as non-root, with every capability dropped,
#      the gRPC and metrics ports published on 127.0.0.1 only; waits for SERVING, generates once,
#      scrapes the metrics, sends SIGTERM and checks a clean exit; removes its containers.
# The image stays (as after `make image`), so the next run's build is all cache hits; REMOVE_IMAGE=1
# removes it. `podman image prune` drops superseded layers, `podman rmi BASE_IMAGE` the base.
#
# Environment: IMAGE (default clasp-serve:image-test), BASE_IMAGE (default
# localhost/clasp-base:bookworm), DEBIAN_MIRROR, WHEELS_DIR (default /opt/wheels),
# HOST_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), REMOVE_IMAGE.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IMAGE=${IMAGE:-clasp-serve:image-test}
BASE_IMAGE=${BASE_IMAGE:-localhost/clasp-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PY=${PY:-.venv/bin/python}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}

step() { printf '\n== %s\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

step "tools"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    echo "installing with apt: ${missing[*]}"
    apt-get update -q
    # With recommends: iptables (netavark's NAT for the build network and published ports), buildah.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
podman --version

step "base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
    echo "cached"
else
    t0=$(date +%s)
    rootfs=$(mktemp -d /var/tmp/clasp-base.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    # python3-dev: headers for the CPU draft kernel; passwd: useradd for the runtime user.
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates,passwd \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
    rm -rf "$rootfs"
    trap - EXIT
    echo "made in $(elapsed "$t0")"
fi

step "build $IMAGE"
t0=$(date +%s)
make --no-print-directory image CONTAINER_ENGINE=podman IMAGE="$IMAGE" BASE_IMAGE="$BASE_IMAGE" \
    TORCH_INDEX_URL=https://pypi.org/simple WHEELS_DIR="$WHEELS_DIR" HOST_CA_BUNDLE="$HOST_CA_BUNDLE"
echo "built in $(elapsed "$t0")"
podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "image size %.0f MiB\n", $1 / 2^20}'

step "run $IMAGE"
status=0
"$PY" deploy/image_test.py --engine podman --image "$IMAGE" || status=$?
if [[ -n "${REMOVE_IMAGE:-}" ]]; then podman rmi -f "$IMAGE" >/dev/null || true; fi
exit "$status"
