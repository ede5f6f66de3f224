# What deploy/redis/sentinel.sh and cluster.sh share; sourced, not run.

usage() {
  echo "usage: $0 up DIR [BASE_PORT] | down DIR" >&2
  exit 2
}

wait_for() { # what, command...: runs the command until it succeeds, for up to 60 s
  local what="$1"
  shift
  for _ in $(seq 1 600); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "$(basename "$0"): timed out waiting for $what" >&2
  exit 1
}

stop_all() { # dir: stops every server whose pid file is in dir
  local pidfile
  for pidfile in "$1"/*.pid; do
    [[ -e "$pidfile" ]] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}
