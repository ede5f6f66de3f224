#!/usr/bin/env bash
# A local Redis Cluster from the redis-server binary, for trying pushgate's cluster mode: three
# primaries and three replicas on 127.0.0.1, cluster-node-timeout 2 s, nothing persisted.
#
#     deploy/redis/cluster.sh up DIR [BASE_PORT]    # ports BASE..BASE+5 (default 27000)
#     deploy/redis/cluster.sh down DIR
#
# `up` waits until every member reports `cluster_state:ok` and every replica is in sync, then
# prints the setting for the nodes. DIR holds the cluster configuration files, pid files and logs.
set -euo pipefail

usage() {
  echo "usage: $0 up DIR [BASE_PORT] | down DIR" >&2
  exit 2
}

action="${1:-}"
dir="${2:-}"
[[ -n "$action" && -n "$dir" ]] || usage

wait_for() { # what, command...
  local what="$1"
  shift
  for _ in $(seq 1 200); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "cluster.sh: timed out waiting for $what" >&2
  exit 1
}

case "$action" in
up)
  base="${3:-27000}"
  mkdir -p "$dir"
  ports=()
  for port in $(seq "$base" $((base + 5))); do
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
      --cluster-node-timeout 2000 --daemonize yes \
      --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log"
    wait_for "redis on $port" redis-cli -p "$port" PING
    ports+=("$port")
  done
  addrs=()
  for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log"
  for port in "${ports[@]}"; do
    wait_for "the cluster to be ok on $port" \
      sh -c "redis-cli -p $port CLUSTER INFO | grep -q cluster_state:ok"
    wait_for "$port in sync" \
      sh -c "redis-cli -p $port INFO replication | grep -q -e role:master -e master_link_status:up"
  done
  urls=()
  for port in "${ports[@]}"; do urls+=("redis://127.0.0.1:$port"); done
  echo "PUSHGATE_REDIS_CLUSTER=$(
    IFS=,
    echo "${urls[*]}"
  )"
  ;;
down)
  for pidfile in "$dir"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  ;;
*)
  usage
  ;;
esac
