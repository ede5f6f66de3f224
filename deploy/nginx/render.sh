#!/usr/bin/env bash
# Renders deploy/nginx/pushgate.conf.template into a complete nginx.conf, on stdout or into the
# file named by the first argument. Each placeholder comes from the environment variable of the
# same name, or its default below. With every default it renders deploy/nginx/pushgate.conf (the
# file docker-compose.yml mounts), so after editing the template run:
#
#     bash deploy/nginx/render.sh deploy/nginx/pushgate.conf
#
# | variable                      | default                                       |
# |-------------------------------|-----------------------------------------------|
# | NGINX_UPSTREAMS               | pushgate-1:8080 pushgate-2:8080 pushgate-3:8080 (host:port, space- or comma-separated) |
# | NGINX_HTTPS_LISTEN            | 443 (a port, or address:port)                  |
# | NGINX_HTTP_LISTEN             | 80 (redirects to HTTPS; serves /nginx-healthz)  |
# | NGINX_TLS_CERT                | /etc/nginx/tls/server.crt                      |
# | NGINX_TLS_KEY                 | /etc/nginx/tls/server.key                      |
# | NGINX_PID                     | /run/nginx.pid                                 |
# | NGINX_TEMP_DIR                | /var/cache/nginx (must exist; Debian's nginx uses /var/lib/nginx) |
# | NGINX_ERROR_LOG               | /var/log/nginx/error.log                       |
# | NGINX_ACCESS_LOG              | /var/log/nginx/access.log                      |
# | NGINX_WORKER_PROCESSES        | auto (one per core)                            |
# | NGINX_WORKER_CONNECTIONS      | 32768                                          |
# | NGINX_WORKER_RLIMIT_NOFILE    | 65536                                          |
# | NGINX_WORKER_SHUTDOWN_TIMEOUT | 10m                                            |
#
# A non-root instance (tests, a laptop) sets the listen ports above 1024 and points the PID,
# temporary directory and logs somewhere writable, e.g.:
#
#     NGINX_UPSTREAMS="127.0.0.1:8081 127.0.0.1:8082" NGINX_HTTPS_LISTEN=127.0.0.1:8443 \
#     NGINX_HTTP_LISTEN=127.0.0.1:8880 NGINX_TLS_CERT=$PWD/certs/server.crt \
#     NGINX_TLS_KEY=$PWD/certs/server.key NGINX_PID=$PWD/run/nginx.pid NGINX_TEMP_DIR=$PWD/run \
#     NGINX_ERROR_LOG=$PWD/run/error.log NGINX_ACCESS_LOG=$PWD/run/access.log \
#     bash deploy/nginx/render.sh run/nginx.conf
#     nginx -c "$PWD/run/nginx.conf" -p "$PWD/run" -e "$PWD/run/error.log" -g 'daemon off;'
set -euo pipefail
# Bash 5.2 expands `&` in a ${var//pattern/replacement} replacement; values are taken literally.
shopt -u patsub_replacement 2>/dev/null || true

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$here/pushgate.conf.template"

: "${NGINX_UPSTREAMS:=pushgate-1:8080 pushgate-2:8080 pushgate-3:8080}"
: "${NGINX_HTTPS_LISTEN:=443}"
: "${NGINX_HTTP_LISTEN:=80}"
: "${NGINX_TLS_CERT:=/etc/nginx/tls/server.crt}"
: "${NGINX_TLS_KEY:=/etc/nginx/tls/server.key}"
: "${NGINX_PID:=/run/nginx.pid}"
: "${NGINX_TEMP_DIR:=/var/cache/nginx}"
: "${NGINX_ERROR_LOG:=/var/log/nginx/error.log}"
: "${NGINX_ACCESS_LOG:=/var/log/nginx/access.log}"
: "${NGINX_WORKER_PROCESSES:=auto}"
: "${NGINX_WORKER_CONNECTIONS:=32768}"
: "${NGINX_WORKER_RLIMIT_NOFILE:=65536}"
: "${NGINX_WORKER_SHUTDOWN_TIMEOUT:=10m}"

die() {
  echo "render.sh: $*" >&2
  exit 1
}

# One `server` line per node.
servers=""
for node in ${NGINX_UPSTREAMS//,/ }; do
  [[ "$node" =~ ^[A-Za-z0-9._-]+:[0-9]+$ || "$node" =~ ^\[[0-9A-Fa-f:]+\]:[0-9]+$ ]] ||
    die "NGINX_UPSTREAMS: '$node' is not host:port"
  servers+="        server $node max_fails=2 fail_timeout=5s;"$'\n'
done
[[ -n "$servers" ]] || die "NGINX_UPSTREAMS is empty"
servers="${servers%$'\n'}"

out="$(<"$template")"
out="${out//"\${NGINX_UPSTREAMS}"/"$servers"}"
for name in NGINX_HTTPS_LISTEN NGINX_HTTP_LISTEN NGINX_TLS_CERT NGINX_TLS_KEY NGINX_PID \
  NGINX_TEMP_DIR NGINX_ERROR_LOG NGINX_ACCESS_LOG NGINX_WORKER_PROCESSES \
  NGINX_WORKER_CONNECTIONS NGINX_WORKER_RLIMIT_NOFILE NGINX_WORKER_SHUTDOWN_TIMEOUT; do
  value="${!name}"
  # A value ends up inside one directive: it must not end it or open a block.
  [[ -n "$value" && "$value" != *[\;\{\}\"\'[:space:]]* ]] ||
    die "$name must be one word without ; { } or quotes (got '$value')"
  out="${out//"\${$name}"/"$value"}"
done

if [[ "$out" =~ \$\{NGINX_[A-Z_]*\} ]]; then
  die "placeholder ${BASH_REMATCH[0]} has no value"
fi

if (($# > 0)); then
  printf '%s\n' "$out" >"$1"
else
  printf '%s\n' "$out"
fi
