#!/usr/bin/env bash
# Long crash-consistency run: ROUNDS (default 100) rounds of gRPC + Kafka load, SIGKILL at a
# random moment, restart, verify (see tests/crash.rs). Needs tansu, as .ci/run installs it.
# Prints each round and the tally: rounds, scans acked before kills, Kafka records, lost.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scand/target}"
export TANSU_BIN="${TANSU_BIN:-$HOME/.cache/scand/tansu/bin/tansu}"
rounds="${ROUNDS:-100}"
log="$(mktemp)"
CRASH_ROUNDS="$rounds" cargo test --locked --test crash sigkill_at_random_moments -- --nocapture 2>&1 \
  | tee "$log" | grep -aE '^round [0-9]+:|^crash harness:|panicked|test result'
status=${PIPESTATUS[0]}
echo "== tally"
grep -a '^crash harness:' "$log" || echo "no tally: the run failed (full output in $log)"
exit "$status"
