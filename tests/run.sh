#!/usr/bin/env bash
# Installs everything the test suite needs on a Debian/Ubuntu machine that has only
# python3, then runs the linters, the type checker and the whole test suite.
# Usage (from a checkout):  bash tests/run.sh  [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "$@" >/dev/null
}

# promtool (Debian package "prometheus") checks the exporter's output format.
if ! command -v promtool >/dev/null 2>&1; then apt_install prometheus; fi

# unbound (built with libnghttp2, as Debian's is) is the real DNS-over-HTTPS server the
# DoH client is tested against; its binary lives in /usr/sbin.
if ! command -v unbound >/dev/null 2>&1 && [ ! -x /usr/sbin/unbound ]; then
  apt_install unbound
fi

# HAProxy and nginx: the SNI router stack of deploy/sni-router/ runs for real in
# tests/e2e/test_sni_router.py. Their binaries live in /usr/sbin.
for program in haproxy nginx; do
  if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
    apt_install "$program"
  fi
done

# Podman (with runc) and debootstrap: tests/deploy/test_container.py builds the image of
# deploy/container/ from a local debootstrapped base and runs it. MTGW_SKIP_CONTAINER_BUILD=1
# skips that test (about 3 minutes the first time) and these packages.
if [ "${MTGW_SKIP_CONTAINER_BUILD:-}" != 1 ]; then
  for program in podman runc debootstrap; do
    if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
      apt_install podman runc debootstrap
      break
    fi
  done
fi

# Debian splits venv/pip out of python3.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt_install python3-venv python3-pip
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

# The installer and container tests need the package registry (they install into a fresh
# venv, and into the image).
.venv/bin/python -m pytest -q -p no:cacheprovider tests/deploy

# Everything else runs in a new network namespace that has only a loopback interface, so
# no test can reach anything but 127.0.0.0/8 and ::1 (an address outside fails at once).
if ! command -v ip >/dev/null 2>&1; then apt_install iproute2; fi
# -m "" clears the default marker filter of pyproject.toml: the soak and benchmark smoke
# tests run here too (a later -m among the extra arguments still wins).
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider --ignore=tests/deploy -m "" "$@")
if unshare --net true 2>/dev/null; then
  exec unshare --net bash -c 'ip link set lo up && exec "$@"' netns "${PYTEST[@]}"
elif unshare --user --map-root-user --net true 2>/dev/null; then
  exec unshare --user --map-root-user --net bash -c 'ip link set lo up && exec "$@"' netns "${PYTEST[@]}"
else
  echo "tests/run.sh: cannot create a network namespace; running on the host network" >&2
  exec "${PYTEST[@]}"
fi
