#!/usr/bin/env bash
# A local Redis Sentinel setup from the redis-server binary, for trying pushgate's sentinel mode:
# one primary, one replica and three sentinels (quorum 2) that monitor the primary as
# `pushgate-main`, all on 127.0.0.1, with nothing persisted.
#
#     deploy/redis/sentinel.sh up DIR [BASE_PORT]    # ports BASE..BASE+4 (default 26400)
#     deploy/redis/sentinel.sh down DIR
#
# `up` waits until the replica is in sync and every sentinel knows it, then prints the
# settings for the nodes. DIR holds the configuration files, pid files and logs.
set -euo pipefail
# shellcheck source=deploy/redis/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

master=pushgate-main
action="${1:-}"
dir="${2:-}"
[[ -n "$action" && -n "$dir" ]] || usage

case "$action" in
up)
  base="${3:-26400}"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd) # redis-server --dir changes its working directory
  primary=$base
  replica=$((base + 1))
  server() { # port, extra arguments...
    local port="$1"
    shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --daemonize yes --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" "$@"
  }
  server "$primary"
  server "$replica" --replicaof 127.0.0.1 "$primary"
  sentinels=()
  for port in $((base + 2)) $((base + 3)) $((base + 4)); do
    # A sentinel rewrites its configuration file: each has its own.
    cat >"$dir/sentinel-$port.conf" <<EOF
sentinel monitor $master 127.0.0.1 $primary 2
sentinel down-after-milliseconds $master 5000
sentinel failover-timeout $master 30000
sentinel parallel-syncs $master 1
EOF
    redis-server "$dir/sentinel-$port.conf" --sentinel --port "$port" --bind 127.0.0.1 \
      --daemonize yes --pidfile "$dir/sentinel-$port.pid" --logfile "$dir/sentinel-$port.log"
    sentinels+=("redis://127.0.0.1:$port")
  done
  wait_for "the replica to sync" \
    sh -c "redis-cli -p $replica INFO replication | grep -q master_link_status:up"
  for url in "${sentinels[@]}"; do
    port="${url##*:}"
    wait_for "the sentinel on $port to see the replica" \
      sh -c "redis-cli -p $port SENTINEL REPLICAS $master | grep -q $replica"
  done
  echo "PUSHGATE_REDIS_SENTINEL=$(
    IFS=,
    echo "${sentinels[*]}"
  )"
  echo "PUSHGATE_REDIS_SENTINEL_MASTER=$master"
  ;;
down)
  stop_all "$dir"
  ;;
*)
  usage
  ;;
esac
