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
# shellcheck source=deploy/redis/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

action="${1:-}"
dir="${2:-}"
[[ -n "$action" && -n "$dir" ]] || usage

case "$action" in
up)
  base="${3:-27000}"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd) # redis-server --dir changes its working directory
  ports=()
  for port in $(seq "$base" $((base + 5))); do
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
      --cluster-node-timeout 2000 --daemonize yes \
      --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log"
    wait_for "redis on $port" redis-cli -p "$port" PING
    ports+=("$port")
  done
  addrs=()
  for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
  sh "$(dirname "${BASH_SOURCE[0]}")/cluster-create.sh" "${addrs[@]}" >"$dir/create.log"
  urls=()
  for port in "${ports[@]}"; do urls+=("redis://127.0.0.1:$port"); done
  echo "PUSHGATE_REDIS_CLUSTER=$(
    IFS=,
    echo "${urls[*]}"
  )"
  ;;
down)
  stop_all "$dir"
  ;;
*)
  usage
  ;;
esac
