#!/usr/bin/env bash
# Renders the SNI router's configuration files from the templates beside this script.
#
#   DOMAIN=example.com bash deploy/sni-router/render.sh OUTDIR
#
# writes OUTDIR/haproxy.cfg, OUTDIR/nginx-site.conf and OUTDIR/mtgworkers.toml. Every
# setting is an environment variable; only DOMAIN is required:
#
#   DOMAIN          the site's host name, served by nginx and named in the secret
#   SECRET          the proxy secret for DOMAIN (default: generated with
#                   `mtgworkers generate-secret --hex DOMAIN`, which must be on PATH;
#                   an existing OUTDIR/mtgworkers.toml keeps its secret)
#   SITE_NAMES      nginx server_name (default: "DOMAIN www.DOMAIN")
#   PUBLIC_BIND     HAProxy's public listener (default ":::443 v4v6": port 443, IPv4 and IPv6)
#   MTGW_ADDR       mtgworkers' listener, loopback (default 127.0.0.1:3128)
#   NGINX_TLS_ADDR  nginx's PROXY-protocol TLS listener, loopback (default 127.0.0.1:8443)
#   HTTP_LISTEN     nginx's plain HTTP listener (default "[::]:80 ipv6only=off")
#   TRUSTED         who may send PROXY headers to mtgworkers and nginx: the address
#                   HAProxy and mtgworkers connect from (default 127.0.0.1/32)
#   CERT, KEY       the site's certificate chain and key (default: certbot's paths,
#                   /etc/letsencrypt/live/DOMAIN/fullchain.pem and privkey.pem)
#   WEBROOT         the site's files (default /var/www/DOMAIN)
#   ACCESS_LOG      nginx's access log of the site (default /var/log/nginx/DOMAIN.access.log)
#   METRICS_ADDR    mtgworkers' Prometheus endpoint (default 127.0.0.1:3129)
#   HAPROXY_SOCKET  HAProxy's admin socket (default /run/haproxy/admin.sock)
#   HAPROXY_MAXCONN HAProxy's connections at once (default 65536; it needs twice as many
#                   open files and raises its limit at start)
#   HAPROXY_USER, HAPROXY_GROUP, HAPROXY_CHROOT
#                   what HAProxy drops to after binding (default haproxy, haproxy,
#                   /var/lib/haproxy: Debian's)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: DOMAIN=example.com bash render.sh OUTDIR}"
: "${DOMAIN:?set DOMAIN to the host name of the site}"

if [ -z "${SECRET:-}" ] && [ -f "$out/mtgworkers.toml" ]; then
  SECRET="$(sed -n 's/^secret = "\(.*\)"$/\1/p' "$out/mtgworkers.toml")"
fi
if [ -z "${SECRET:-}" ]; then
  if ! command -v mtgworkers >/dev/null 2>&1; then
    echo "render.sh: set SECRET, or put mtgworkers on PATH to generate one" >&2
    exit 1
  fi
  SECRET="$(mtgworkers generate-secret --hex "$DOMAIN")"
fi

SITE_NAMES="${SITE_NAMES:-$DOMAIN www.$DOMAIN}"
PUBLIC_BIND="${PUBLIC_BIND:-:::443 v4v6}"
MTGW_ADDR="${MTGW_ADDR:-127.0.0.1:3128}"
NGINX_TLS_ADDR="${NGINX_TLS_ADDR:-127.0.0.1:8443}"
HTTP_LISTEN="${HTTP_LISTEN:-[::]:80 ipv6only=off}"
TRUSTED="${TRUSTED:-127.0.0.1/32}"
CERT="${CERT:-/etc/letsencrypt/live/$DOMAIN/fullchain.pem}"
KEY="${KEY:-/etc/letsencrypt/live/$DOMAIN/privkey.pem}"
WEBROOT="${WEBROOT:-/var/www/$DOMAIN}"
ACCESS_LOG="${ACCESS_LOG:-/var/log/nginx/$DOMAIN.access.log}"
METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:3129}"
HAPROXY_SOCKET="${HAPROXY_SOCKET:-/run/haproxy/admin.sock}"
HAPROXY_MAXCONN="${HAPROXY_MAXCONN:-65536}"
HAPROXY_USER="${HAPROXY_USER:-haproxy}"
HAPROXY_GROUP="${HAPROXY_GROUP:-haproxy}"
HAPROXY_CHROOT="${HAPROXY_CHROOT:-/var/lib/haproxy}"
# mtgworkers takes the fronting address as ip + port.
NGINX_TLS_HOST="${NGINX_TLS_ADDR%:*}"
NGINX_TLS_HOST="${NGINX_TLS_HOST#[}"
NGINX_TLS_HOST="${NGINX_TLS_HOST%]}"
NGINX_TLS_PORT="${NGINX_TLS_ADDR##*:}"

VARS=(DOMAIN SECRET SITE_NAMES PUBLIC_BIND MTGW_ADDR NGINX_TLS_ADDR NGINX_TLS_HOST
  NGINX_TLS_PORT HTTP_LISTEN TRUSTED CERT KEY WEBROOT ACCESS_LOG METRICS_ADDR
  HAPROXY_SOCKET HAPROXY_MAXCONN HAPROXY_USER HAPROXY_GROUP HAPROXY_CHROOT)

render() {  # template -> output, every @NAME@ replaced by the value of NAME
  local script="" name value
  for name in "${VARS[@]}"; do
    value="${!name}"
    case "$value" in
      *$'\n'* | *'"'*) echo "render.sh: $name must be one line without quotes" >&2; exit 1 ;;
    esac
    value="${value//\\/\\\\}"
    value="${value//|/\\|}"
    value="${value//&/\\&}"
    script+="s|@${name}@|${value}|g;"
  done
  sed -e "$script" "$1" >"$2.tmp"
  if grep -n '@[A-Z_]*@' "$2.tmp" >&2; then
    echo "render.sh: $1 has placeholders this script does not know" >&2
    rm -f "$2.tmp"
    exit 1
  fi
  mv "$2.tmp" "$2"
}

mkdir -p "$out"
render "$here/haproxy.cfg.in" "$out/haproxy.cfg"
render "$here/nginx-site.conf.in" "$out/nginx-site.conf"
render "$here/mtgworkers.toml.in" "$out/mtgworkers.toml"
chmod 0644 "$out/haproxy.cfg" "$out/nginx-site.conf"
chmod 0644 "$out/mtgworkers.toml"  # as deploy/install.sh: the service's DynamicUser reads it
echo "rendered $out/haproxy.cfg, $out/nginx-site.conf and $out/mtgworkers.toml for $DOMAIN"
