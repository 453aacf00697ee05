#!/bin/sh
# Entry point of the mtgworkers image.
#
#   (no arguments) or "run"   run the proxy with $MTGW_CONFIG (/etc/mtgworkers/config.toml)
#   any mtgworkers command    e.g. "access", "doctor --no-probe": the config path is added
#                             when the command takes one and none is given
#   "healthcheck"             the image's health check (deploy/container/healthcheck.py)
#
# The proxy replaces this shell (exec), so it is PID 1 of the container and gets the
# container's SIGTERM (docker stop) and SIGHUP (docker kill -s HUP: reload) itself.
set -eu
CONFIG="${MTGW_CONFIG:-/etc/mtgworkers/config.toml}"
PROG="${MTGW_PROGRAM:-mtgworkers}"

needs_config() {
  if [ -d "$CONFIG" ]; then
    echo "mtgworkers-entrypoint: $CONFIG is a directory; mount the config file itself" \
      "(-v /etc/mtgworkers/config.toml:$CONFIG:ro)" >&2
    exit 78
  fi
  if [ ! -f "$CONFIG" ]; then
    echo "mtgworkers-entrypoint: no config file at $CONFIG; mount one" \
      "(-v /etc/mtgworkers/config.toml:$CONFIG:ro) or set MTGW_CONFIG;" \
      "'mtgworkers generate-secret HOSTNAME' makes a secret" >&2
    exit 78
  fi
  if [ ! -r "$CONFIG" ]; then
    echo "mtgworkers-entrypoint: $CONFIG is not readable by uid $(id -u);" \
      "make it world-readable (chmod 0644) or owned by that uid" >&2
    exit 78
  fi
}

if [ "$#" -eq 0 ]; then
  set -- run
fi
case "$1" in
  run | access | doctor)
    command="$1"
    shift
    needs_config
    # The config path comes last unless the arguments already end in one.
    last=""
    for argument in "$@"; do last="$argument"; done
    case "$last" in
      *.toml | /*) exec "$PROG" "$command" "$@" ;;
      *) exec "$PROG" "$command" "$@" "$CONFIG" ;;
    esac
    ;;
  healthcheck)
    needs_config
    exec python3 /opt/mtgworkers/healthcheck.py
    ;;
  generate-secret | simple-run | --version | --help | -h)
    exec "$PROG" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
