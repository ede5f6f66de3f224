#!/bin/sh
# Makes a Redis Cluster of three primaries with a replica each out of six empty
# `--cluster-enabled yes` servers, and waits until every member reports `cluster_state:ok` and
# every replica is in sync. Run again on a cluster that is already ok, it changes nothing.
#
#     sh deploy/redis/cluster-create.sh HOST:PORT HOST:PORT HOST:PORT HOST:PORT HOST:PORT HOST:PORT
#
# POSIX sh: deploy/redis/cluster.sh runs it for a local cluster, and the `cluster` profile of
# docker-compose.yml in the redis image (busybox sh), with the members' fixed addresses.
set -eu

[ "$#" -eq 6 ] || {
  echo "usage: $0 HOST:PORT x6" >&2
  exit 2
}

cli() { # host:port, command...
  addr="$1"
  shift
  redis-cli -h "${addr%:*}" -p "${addr##*:}" "$@"
}

wait_for() { # what, command...: runs the command until it succeeds, for up to 60 s
  what="$1"
  shift
  tries=0
  until "$@" >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 600 ]; then
      echo "cluster-create.sh: timed out waiting for $what" >&2
      exit 1
    fi
    sleep 0.1
  done
}

cluster_ok() { cli "$1" CLUSTER INFO | grep -q cluster_state:ok; }
in_sync() { cli "$1" INFO replication | grep -q -e role:master -e master_link_status:up; }

for addr in "$@"; do wait_for "redis at $addr" cli "$addr" PING; done
if ! cluster_ok "$1"; then
  redis-cli --cluster create "$@" --cluster-replicas 1 --cluster-yes
fi
for addr in "$@"; do
  wait_for "the cluster to be ok at $addr" cluster_ok "$addr"
  wait_for "$addr to be in sync" in_sync "$addr"
done
