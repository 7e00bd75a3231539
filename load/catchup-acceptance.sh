#!/usr/bin/env bash
# The catch-up acceptance run (issue 12): 50 simulated devices, 30% of them offline at any time, 10 minutes at
# ~1,000 events/s (150 tx/s of the load's mix), against the demo's private PostgreSQL, Mosquitto with dynamic
# security, and the bridge. Mosquitto queues at most BROKER_QUEUE messages per offline session, so devices
# offline for more than a moment miss messages there and must fill the jumps through the changes API.
#
#   load/catchup-acceptance.sh                       # the full run, report in catchup-acceptance.json
#   DURATION=60s load/catchup-acceptance.sh          # a short check
#
# Settings (environment): DURATION (10m), RATE (150 tx/s), DEVICES (50), OFFLINE (0.3), BROKER_QUEUE (100),
# JSON (catchup-acceptance.json), PROFILE (release; "debug" uses the debug build).
# Exits with delta-load's status: 0 only with no loss and every device's state equal to the database.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10m}
RATE=${RATE:-150}
DEVICES=${DEVICES:-50}
OFFLINE=${OFFLINE:-0.3}
BROKER_QUEUE=${BROKER_QUEUE:-100}
JSON=${JSON:-catchup-acceptance.json}
PROFILE=${PROFILE:-release}
bin="${CARGO_TARGET_DIR:-target}/$PROFILE"
flag=""
[ "$PROFILE" = release ] && flag=--release
cargo build $flag --locked -q --bin delta-bridge
cargo build $flag --locked -q -p delta-load
work=$(mktemp -d)
# The servers run as their own users when this runs as root: they must be able to enter the directory.
chmod 755 "$work"
# The demo sets everything up, runs a short load of its own, then stays up for this run.
"$bin/delta-bridge" demo --stay --duration 2s --rate 20 --broker-queue "$BROKER_QUEUE" --dir "$work/demo" \
  >"$work/demo.out" 2>&1 &
demo=$!
stop_demo() {
  kill -TERM "$demo" 2>/dev/null || true
  wait "$demo" 2>/dev/null || true
  rm -rf "$work"
}
trap stop_demo EXIT
for _ in $(seq 1 600); do
  grep -q "the demo stays up" "$work/demo.out" && break
  if ! kill -0 "$demo" 2>/dev/null; then
    cat "$work/demo.out" >&2
    echo "catchup-acceptance: the demo stopped before it was ready" >&2
    exit 1
  fi
  sleep 1
done
grep -q "the demo stays up" "$work/demo.out" || { echo "catchup-acceptance: the demo is not up after 10 min" >&2; exit 1; }
echo "delta-load: $DEVICES devices, $OFFLINE offline, $RATE tx/s for $DURATION, broker queue $BROKER_QUEUE per session"
set +e
"$bin/delta-load" --config "$work/demo/delta-bridge.toml" --devices "$DEVICES" --offline "$OFFLINE" \
  --rate "$RATE" --duration "$DURATION" --merchants 2 --branches 4 --products 100 --json "$JSON"
status=$?
set -e
exit $status
