#!/usr/bin/env bash
# Runs scand's fuzz targets (fuzz/), each for a bounded time, and reports executions, corpus
# size and whether it crashed. Exits non-zero when any target found a crash or failed to run.
#
#   scripts/fuzz.sh                      # every target, FUZZ_SECONDS (60) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh engine kafka_record
#
# Environment:
#   FUZZ_SECONDS      run time per target (default 60)
#   FUZZ_CORPUS_DIR   where new inputs go, one directory per target (default
#                     ~/.cache/scand/fuzz-corpus); the committed seeds in fuzz/corpus/ are only
#                     read, so a run never grows them
#   CARGO_TARGET_DIR  build directory (default ~/.cache/scand/target-fuzz)
#   FUZZ_LOG_DIR      libFuzzer's output per target (default a fresh temporary directory)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_CORPUS_DIR=${FUZZ_CORPUS_DIR:-$HOME/.cache/scand/fuzz-corpus}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/scand/target-fuzz}
FUZZ_LOG_DIR=${FUZZ_LOG_DIR:-$(mktemp -d -t scand-fuzz.XXXXXX)}
mkdir -p "$FUZZ_LOG_DIR"

# cargo-fuzz lives in a cached root so CI and fresh shells do not rebuild it.
FUZZ_ROOT=$HOME/.cache/scand/cargo-fuzz
export PATH="$FUZZ_ROOT/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz into $FUZZ_ROOT" >&2
  cargo install cargo-fuzz --locked --root "$FUZZ_ROOT"
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Built before running, so build time is not counted against a target's run time.
for target in "${targets[@]}"; do
  cargo +nightly fuzz build "$target" >&2 || { echo "fuzz build of $target failed" >&2; exit 1; }
done

# What libFuzzer leaves for a finding (not slow-unit-*, which is only a report).
findings() { find "$1" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l; }

failed=0
summary=()
for target in "${targets[@]}"; do
  corpus="$FUZZ_CORPUS_DIR/$target"
  artifacts="$repo/fuzz/artifacts/$target"
  log="$FUZZ_LOG_DIR/$target.log"
  mkdir -p "$corpus" "$artifacts"
  before=$(findings "$artifacts")
  echo "== $target: ${FUZZ_SECONDS}s, new inputs in $corpus, log $log" >&2
  seeds=("fuzz/corpus/$target")
  # Inputs that once failed are replayed first thing on every run.
  [ -d "fuzz/regressions/$target" ] && seeds+=("fuzz/regressions/$target")
  status=0
  # The scratch directory comes first: libFuzzer writes new inputs to the first corpus only.
  cargo +nightly fuzz run "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  after=$(findings "$artifacts")
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n1)
  units=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -n1 | cut -d' ' -f2)
  if [ "$status" -ne 0 ] || [ "$after" -gt "$before" ]; then
    failed=1
    verdict="CRASH (exit $status; input in $artifacts)"
    grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$log" >&2 || true
    echo "reproduce: cargo +nightly fuzz run $target <input>" >&2
  else
    verdict="no crash"
  fi
  summary+=("$(printf '%-14s executions %-10s (%s)  corpus %-12s %s' \
    "$target" "${units:-?}" "${runs:-no Done line}" "${corp:-?}" "$verdict")")
done

echo
echo "fuzz summary (${FUZZ_SECONDS}s per target; logs in $FUZZ_LOG_DIR)"
printf '%s\n' "${summary[@]}"
exit "$failed"
