#!/usr/bin/env bash
# pushgate's whole test suite, runnable on a fresh Debian machine with a Rust toolchain:
# installs what the tests need (redis-server, openssl, Node.js, Chromium), then checks formatting
# and lints, runs the unit, integration and cluster tests, the JavaScript SDK's tests and the
# browser tests of the demo chat and the admin console, and the Autobahn|Testsuite conformance
# cases against /echo when the Autobahn runner is present (../shared/tools/autobahn or
# $AUTOBAHN_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# nginx lives in /usr/sbin, which a non-root PATH may lack.
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
# The JavaScript SDK's tests (clients/js): Node's test runner, npm, and Chromium for the browser
# tests of the demo chat and the admin console.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
# Prometheus and promtool: the alert rules' unit tests and the live check of rules and dashboard.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if ((${#missing[@]})); then
  echo "test: installing ${missing[*]} from Debian's packages"
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Debian's package starts a system nginx on port 80; the tests run their own instances.
  if [[ " ${missing[*]} " == *" nginx "* ]]; then
    $sudo service nginx stop >/dev/null 2>&1 || true
  fi
  # Likewise a system Prometheus on :9090; the tests start their own on free ports.
  if [[ " ${missing[*]} " == *" prometheus "* ]]; then
    $sudo service prometheus stop >/dev/null 2>&1 || true
  fi
fi

# The Socket.IO server the bench compares against (crates/bench/tests/scenarios.rs runs it).
(cd crates/bench/socketio && npm ci --no-audit --no-fund)

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# The JavaScript SDK against real nodes (target/debug/pushgate, built by the tests above) and
# Redis, and the demo chat and the admin console in Chromium (the console also through nginx);
# screenshots go to target/screenshots/.
cargo build -p pushgate --locked
(cd clients/js && npm ci --no-audit --no-fund && node --test)
# The SDK's tests against real nodes once more without batches (pushgate.batch off): all but the
# browser's (it checks what Chromium negotiates) and CORS (no SDK).
(cd clients/js && PUSHGATE_SDK_BATCH=0 node --test $(ls tests/*.test.js | grep -v -e browser -e cors))

autobahn_dir="${AUTOBAHN_DIR:-../shared/tools/autobahn}"
if [[ -f "$autobahn_dir/run.sh" ]]; then
  bash scripts/autobahn.sh "$autobahn_dir"
else
  echo "test: Autobahn runner not found at $autobahn_dir; conformance cases skipped (README: Conformance)"
fi
