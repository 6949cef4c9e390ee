#!/usr/bin/env bash
# The fleet test (tests/fleet.rs) as a soak: ROUNDS graceful leave-and-return rounds on top of
# its joins, kills and restarts, RUNS times over; prints each run's tally (scans acked and
# found once on every instance, STALLED checked against ownership, moves per partition).
# Needs tansu ($TANSU_BIN or ~/.cache/scand/tansu, installed by .ci/run).
#
#   ROUNDS=30 RUNS=3 bash scripts/fleet-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scand/target}"
ROUNDS="${ROUNDS:-30}"
RUNS="${RUNS:-1}"
for run in $(seq 1 "$RUNS"); do
  FLEET_CHURN_ROUNDS="$ROUNDS" cargo test --locked --features scand/failpoints --test fleet \
    -- --nocapture 2>&1 | grep -A1 -E "fleet tally|test result|panicked" | sed "s/^/run $run: /"
done
