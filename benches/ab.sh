#!/usr/bin/env bash
# A/B of two scand builds on the same workload, alternating runs so drift hits both alike:
#   benches/ab.sh OLD_BIN OLD_CONFIG NEW_BIN NEW_CONFIG [ROUNDS]
# e.g. build an older commit in a worktree, copy its target/release/scand aside, and compare it
# with the current one (each with the config/scand.toml of its own commit).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 4 ] || { echo "usage: $0 OLD_BIN OLD_CONFIG NEW_BIN NEW_CONFIG [ROUNDS]" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/scand/target}"
cargo build --release --locked -p scand-load >&2
LOAD="$CARGO_TARGET_DIR/release/scand-load"
run() { # $1 = binary, $2 = config, $3 = label
  local dir pid out
  dir=$(mktemp -d)
  SCAND_STORE__PATH="$dir" SCAND_GRPC__LISTEN=127.0.0.1:50771 SCAND_ADMIN__LISTEN=127.0.0.1:9771 \
    SCAND_LOG__FILTER=warn "$1" run --config "$2" &
  pid=$!
  for _ in $(seq 600); do curl -fs http://127.0.0.1:9771/readyz >/dev/null 2>&1 && break; sleep 0.05; done
  out=$("$LOAD" --target http://127.0.0.1:50771 --shipments "${SHIPMENTS:-20000}" --batch-size 500 \
    --streams 4 --quiet --json)
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
  echo "$3 $(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["scans_per_s"]), "scans/s, p99", d["ack_latency_ms"]["p99"], "ms, ok", d["ok"])')"
}
for _ in $(seq "${5:-3}"); do
  run "$1" "$2" old
  run "$3" "$4" new
done
