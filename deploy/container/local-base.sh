#!/usr/bin/env bash
# Makes a local base image for deploy/container/Dockerfile where no image can be pulled
# from a registry: a minimal Debian (debootstrap, from the Debian mirror apt uses) with
# python3 and python3-venv, imported into Podman as IMAGE.
#
#   sudo bash deploy/container/local-base.sh [IMAGE]     (default localhost/mtgworkers-base:bookworm)
#   podman build --pull=never --build-arg BASE=localhost/mtgworkers-base:bookworm \
#       -f deploy/container/Dockerfile -t mtgworkers .
#
# An existing IMAGE is kept (delete it with `podman rmi IMAGE` to make it again).
# MTGW_DEBIAN_MIRROR and MTGW_DEBIAN_SUITE choose the mirror and the release
# (default: the first deb.debian.org-style URI of /etc/apt/sources.list.d/debian.sources,
# else http://deb.debian.org/debian; bookworm).
set -euo pipefail
IMAGE="${1:-localhost/mtgworkers-base:bookworm}"
SUITE="${MTGW_DEBIAN_SUITE:-bookworm}"
ENGINE="${MTGW_CONTAINER_ENGINE:-podman}"

if "$ENGINE" image exists "$IMAGE" 2>/dev/null; then
  echo "local-base.sh: $IMAGE exists"
  exit 0
fi
for program in debootstrap "$ENGINE"; do
  if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
    echo "local-base.sh: $program is missing (apt-get install debootstrap podman)" >&2
    exit 1
  fi
done
MIRROR="${MTGW_DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
  MIRROR="$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources | head -n1)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/mtgworkers-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
PATH="$PATH:/usr/sbin:/sbin" debootstrap --variant=minbase --include=python3,python3-venv \
  "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  tail -n 20 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  exit 1
}
rm -f "$rootfs.log"
# Smaller image: no package lists, caches, docs or man pages.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | "$ENGINE" import --quiet --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "local-base.sh: imported $IMAGE ($SUITE from $MIRROR)"
