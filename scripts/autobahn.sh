#!/usr/bin/env bash
# Runs the Autobahn|Testsuite against a pushgate node's /echo endpoint: cases 1.x-10.x, or the
# CASES given (e.g. '12.*,13.*', the permessage-deflate groups).
#
#   scripts/autobahn.sh AUTOBAHN_DIR [OUTDIR] [CASES]
#
# The node is the debug build, or PUSHGATE_BIN (the compression groups want a release build:
# `PUSHGATE_BIN=target/release/pushgate scripts/autobahn.sh DIR target/autobahn-deflate '12.*,13.*'`
# takes about 15 minutes here, the debug build hours).
#
# AUTOBAHN_DIR holds run.sh (a Python 3 runner of the suite). Reports land in OUTDIR
# (default target/autobahn). Exits non-zero unless every case is OK, NON-STRICT or INFORMATIONAL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
autobahn_dir="$1"
outdir="${2:-target/autobahn}"

if [[ -n "${PUSHGATE_BIN:-}" ]]; then
  bin=$PUSHGATE_BIN
else
  cargo build -p pushgate --locked
  bin=target/debug/pushgate
fi
secret="autobahn-$(date +%s%N)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# Case group 9 sends messages of up to 16 MiB; the node's limit is raised to match.
PUSHGATE_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --jwt-secret "$secret" \
  --max-message-bytes 16777216 --client-rate 100000 --client-burst 100000 &
node=$!
trap 'kill $node 2>/dev/null || true; wait $node 2>/dev/null || true' EXIT

for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
token=$(PUSHGATE_JWT_SECRET="$secret" "$bin" token --sub autobahn --ttl 2h)
bash "$autobahn_dir/run.sh" "ws://127.0.0.1:$port/echo?token=$token" "$outdir" ${3:+"$3"}
