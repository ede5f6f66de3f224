#!/usr/bin/env bash
# pushgate's whole test suite, runnable on a fresh Debian machine with a Rust toolchain:
# installs what the tests need (redis-server, openssl), then checks formatting and lints,
# runs the unit, integration and cluster tests, and the Autobahn|Testsuite conformance cases
# against /echo when the Autobahn runner is present (../shared/tools/autobahn or $AUTOBAHN_DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
  echo "test: installing ${missing[*]} from Debian's packages"
  sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

autobahn_dir="${AUTOBAHN_DIR:-../shared/tools/autobahn}"
if [[ -f "$autobahn_dir/run.sh" ]]; then
  bash scripts/autobahn.sh "$autobahn_dir"
else
  echo "test: Autobahn runner not found at $autobahn_dir; conformance cases skipped (README: Conformance)"
fi
