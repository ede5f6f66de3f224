#!/usr/bin/env bash
# Restarts the nodes described in DIR one at a time, as a rolling deploy does: SIGTERM (the node
# drains: its clients get 1001 and reconnect), wait for it to exit, start it again with the same
# arguments, wait until it is ready and its clients are back, then the next node.
#
#   scripts/rolling_restart.sh DIR
#
# DIR holds, per node N: N.args (the `pushgate` binary, then its arguments, one per line), N.pid,
# and N.port. Every wait is bounded; the script fails if one runs out.
set -euo pipefail
dir=$1
wait_until() { # wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 10))); do "$@" && return 0; sleep 0.1; done
  echo "rolling_restart: $what did not happen within ${limit}s" >&2; return 1
}
connections() { curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | sed -n 's/^pushgate_connections \([0-9.]*\)$/\1/p'; }
at_least() { local n; n=$(connections "$1"); [[ -n $n ]] && (( ${n%.*} >= $2 )); }
for args_file in "$dir"/*.args; do
  name=$(basename "$args_file" .args)
  pid=$(cat "$dir/$name.pid"); port=$(cat "$dir/$name.port")
  before=$(connections "$port"); before=${before%.*}
  started=$EPOCHREALTIME
  kill -TERM "$pid"
  wait_until 60 "exit of node $name" bash -c "! kill -0 $pid 2>/dev/null"
  mapfile -t cmd < "$args_file"
  "${cmd[@]}" >/dev/null 2>&1 &
  echo $! > "$dir/$name.pid"
  wait_until 90 "node $name ready" curl -fsS "http://127.0.0.1:$port/readyz" -o /dev/null
  # Its clients return to it (they reconnect to the address they had).
  want=$(( before * 99 / 100 ))
  wait_until 120 "node $name back to $want connections" at_least "$port" "$want"
  echo "rolling_restart: node $name restarted, $(connections "$port") connections back after $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $started }") s" >&2
done
