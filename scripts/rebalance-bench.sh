#!/usr/bin/env bash
# What a rebalance costs: instance A consumes SHIPMENTS shipments (STEPS scans each) from a
# one-partition scans topic and replicates them to the changelog; then B joins and A leaves
# (SIGTERM), and B restores the partition from the changelog before consuming it. Prints the
# restore's time (scand_kafka_restore_seconds: assignment to consumption) and per 100k
# shipments. Needs tansu ($TANSU_BIN or ~/.cache/scand/tansu, installed by .ci/run), the
# scand and scand-load binaries of $PROFILE (debug: what .ci/run builds) and Python's
# confluent-kafka (installed when missing).
#
#   SHIPMENTS=100000 bash scripts/rebalance-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SHIPMENTS="${SHIPMENTS:-100000}"
STEPS="${STEPS:-2}"
PROFILE="${PROFILE:-debug}"
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/scand/target}/$PROFILE"
TANSU_BIN="${TANSU_BIN:-$HOME/.cache/scand/tansu/bin/tansu}"
python3 -c "import confluent_kafka" 2>/dev/null || pip install -q confluent-kafka

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { # admin-port series -> value (0 if absent)
  curl -fs "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s { print $2; found=1 } END { if (!found) print 0 }'
}
wait_for() { # description, seconds, command...
  local what="$1" limit="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    if ((SECONDS > deadline)); then echo "timed out: $what" >&2; exit 1; fi
    sleep 0.5
  done
}

broker_port="$(free_port)"
RUST_LOG=warn "$TANSU_BIN" broker --storage-engine memory://tansu/ \
  --listener-url "tcp://127.0.0.1:$broker_port" --advertised-listener-url "tcp://127.0.0.1:$broker_port" \
  >"$work/tansu.log" 2>&1 &
pids+=($!)
brokers="127.0.0.1:$broker_port"
wait_for "tansu listens" 30 python3 -c "import socket; socket.create_connection(('127.0.0.1', $broker_port))"
python3 - "$brokers" <<'EOF'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({"bootstrap.servers": sys.argv[1]})
topics = [NewTopic("scans.raw", 1), NewTopic("scans.dlq", 1),
          NewTopic("scand.changelog", 1, config={"cleanup.policy": "compact"}),
          NewTopic("scand.members", 1)]
for topic, future in admin.create_topics(topics).items():
    future.result()
EOF

start() { # name -> admin port; starts scand on its own data directory
  local name="$1" grpc admin
  grpc="$(free_port)"; admin="$(free_port)"
  cat >"$work/$name.toml" <<EOF
[grpc]
listen = "127.0.0.1:$grpc"
[admin]
listen = "127.0.0.1:$admin"
[store]
path = "$work/$name"
[kafka]
brokers = "$brokers"
[kafka.source]
enabled = true
[kafka.consumer.properties]
"session.timeout.ms" = "6000"
"statistics.interval.ms" = "1000"
EOF
  RUST_LOG=warn "$TARGET/scand" run --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  echo "$admin $!" # runs in a subshell: the caller records the pid for the cleanup
}

read -r a_admin a_pid < <(start a)
pids+=("$a_pid")
wait_for "A ready" 60 curl -fs "http://127.0.0.1:$a_admin/readyz" -o /dev/null
"$TARGET/scand-load" --mode kafka --kafka-brokers "$brokers" --shipments "$SHIPMENTS" --steps "$STEPS" \
  --duplicate-pct 0 --out-of-order-pct 0 --invalid-pct 0 --quiet >"$work/load.txt"
produced="$(metric "$a_admin" scand_kafka_records_total'{topic="scans.raw"}')"
applied() {
  local consumed
  consumed="$(metric "$a_admin" scand_kafka_records_total'{topic="scans.raw"}')"
  [[ "${consumed%.*}" -ge $((SHIPMENTS * STEPS)) ]]
}
started=$SECONDS
wait_for "A consumed everything" 1800 applied
echo "A applied $((SHIPMENTS * STEPS)) records of $SHIPMENTS shipments in $((SECONDS - started)) s (had $produced when the load ended)"
sleep 3 # the changelog's last writes

read -r b_admin b_pid < <(start b)
pids+=("$b_pid")
wait_for "B ready" 60 curl -fs "http://127.0.0.1:$b_admin/readyz" -o /dev/null
kill -TERM "$a_pid"
owned() { [[ "$(metric "$b_admin" scand_kafka_partitions_assigned)" == 1 ]]; }
wait_for "B owns the partition" 1800 owned
seconds="$(metric "$b_admin" scand_kafka_restore_seconds_sum)"
count="$(metric "$b_admin" scand_kafka_restore_seconds_count)"
restored="$(metric "$b_admin" scand_kafka_restored_shipments_total)"
python3 - "$seconds" "$count" "$restored" "$SHIPMENTS" <<'EOF'
import sys
seconds, count, restored, shipments = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
print(f"B restored {shipments} shipments ({restored:.0f} changelog snapshots installed, the topic not yet compacted) "
      f"in {count:.0f} restore(s), {seconds:.2f} s from assignment to consumption")
print(f"{seconds / shipments * 100_000:.2f} s per 100k shipments")
EOF
