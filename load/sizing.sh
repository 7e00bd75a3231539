#!/usr/bin/env bash
# Sizing figures for docs/sizing.md, measured on this machine (a benchmark that prints figures; it asserts nothing):
#   - WAL the business writes generate with and without capture, per event;
#   - what the outbox holds per event while nothing is published (a broker outage), so bytes per hour of outage;
#   - WAL and change-log bytes per event when the bridge publishes the backlog.
# It starts its own PostgreSQL and Mosquitto on free loopback ports in a temporary directory (Debian's
# `postgresql` and `mosquitto` packages), writes delta-load's mix for SIZING_DURATION at SIZING_RATE
# transactions/s, and stops everything at the end.
#
#   cargo build --release --workspace --bins && load/sizing.sh
#   SIZING_RATE=200 SIZING_DURATION=60s BIN=target/debug load/sizing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
RATE=${SIZING_RATE:-140}
DURATION=${SIZING_DURATION:-60s}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
for b in "$BIN/delta-bridge" "$BIN/delta-load" "$PGBIN/initdb" /usr/sbin/mosquitto; do
  [ -x "$b" ] || { echo "sizing: $b not found (build with cargo build --release --workspace --bins; apt-get install postgresql mosquitto)" >&2; exit 1; }
done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tmp=$(mktemp -d); PGPORT=$(free_port); MQPORT=$(free_port); HTTPPORT=$(free_port)
bridge=""; mq=""
cleanup() {
  [ -n "$bridge" ] && kill "$bridge" 2>/dev/null && wait "$bridge" 2>/dev/null || true
  [ -n "$mq" ] && kill "$mq" 2>/dev/null || true
  "$PGBIN/pg_ctl" -D "$tmp/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
RUNAS=()
[ "$(id -u)" = 0 ] && { chown -R nobody "$tmp" 2>/dev/null; RUNAS=(runuser -u nobody --); }
"${RUNAS[@]}" "$PGBIN/initdb" -D "$tmp/pg" -U postgres -A trust >/dev/null
"${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$tmp/pg" -l "$tmp/pg.log" -w -o "-p $PGPORT -k $tmp -c listen_addresses=127.0.0.1" start >/dev/null
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQPORT" > "$tmp/mq.conf"
/usr/sbin/mosquitto -c "$tmp/mq.conf" >"$tmp/mq.log" 2>&1 & mq=$!
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }
psql -c "CREATE DATABASE sizing"
psql -d sizing -f sql/reference_schema.sql >/dev/null
cat > "$tmp/bridge.toml" <<TOML
env = "size"
[postgres]
url = "postgres://postgres@127.0.0.1:$PGPORT/sizing"
[mqtt]
url = "mqtt://127.0.0.1:$MQPORT"
[http]
listen = "127.0.0.1:$HTTPPORT"
TOML
export DELTA_BRIDGE_CONFIG="$tmp/bridge.toml"
q() { psql -d sizing -At -c "$1"; }
wal() { q "SELECT pg_current_wal_lsn()"; }
walbytes() { q "SELECT pg_wal_lsn_diff('$2', '$1')::bigint"; }
load() { "$BIN/delta-load" --rate "$RATE" --duration "$DURATION" --grace 1s --json "$tmp/$1.json" >"$tmp/$1.log" 2>&1 || true; }
written() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sum(s['written'] for s in r['streams'].values()))" "$tmp/$1.json"; }

echo "sizing: $RATE tx/s for $DURATION per phase (delta-load's mix), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')"
# Phase 1: no capture installed. A checkpoint before each phase, so that each starts with the same full-page writes.
q "CHECKPOINT" >/dev/null
a=$(wal); load nocapture; b=$(wal)
n0=$(written nocapture); w0=$(walbytes "$a" "$b")
# Phase 2: capture installed, bridge not running (a broker outage: the outbox fills).
"$BIN/delta-bridge" migrate >"$tmp/migrate.log" 2>&1
q "CHECKPOINT" >/dev/null
a=$(wal); load outage; b=$(wal)
n1=$(written outage); w1=$(walbytes "$a" "$b")
rows=$(q "SELECT count(*) FROM delta_bridge.outbox")
obytes=$(q "SELECT pg_total_relation_size('delta_bridge.outbox')")
# Phase 3: the bridge publishes the backlog (numbering, change log, deletes).
q "CHECKPOINT" >/dev/null
a=$(wal)
"$BIN/delta-bridge" run >"$tmp/bridge.log" 2>&1 & bridge=$!
t0=$(date +%s.%N)
until [ "$(q "SELECT count(*) FROM delta_bridge.outbox")" = 0 ]; do sleep 0.5; done
t1=$(date +%s.%N)
b=$(wal); w2=$(walbytes "$a" "$b")
logged=$(q "SELECT count(*) FROM delta_bridge.change_log")
lbytes=$(q "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('delta_bridge.change_log') WHERE isleaf")
python3 - "$n0" "$w0" "$n1" "$w1" "$rows" "$obytes" "$w2" "$logged" "$lbytes" "$t0" "$t1" <<'PY'
import sys
n0,w0,n1,w1,rows,ob,w2,logged,lb=map(int,sys.argv[1:10]); t0,t1=map(float,sys.argv[10:12])
print(f"no capture:        {n0:>8} events written (as delta-load counts them), WAL {w0/max(n0,1):8.0f} B/event")
print(f"capture, no bridge:{n1:>8} events written, WAL {w1/max(n1,1):8.0f} B/event "
      f"(+{(w1/max(n1,1))-(w0/max(n0,1)):.0f} B/event for capture)")
print(f"outbox while unpublished: {rows} rows, {ob} B with indexes = {ob/max(rows,1):.0f} B/row; "
      f"at 1,000 events/s: {ob/max(rows,1)*3600*1000/2**30:.2f} GiB per hour of outage")
print(f"publishing the backlog: {rows} events in {t1-t0:.1f} s, WAL {w2/max(rows,1):.0f} B/event "
      f"(numbering, change log, outbox deletes)")
print(f"change log: {logged} events, {lb} B with indexes = {lb/max(logged,1):.0f} B/event; "
      f"{lb/max(logged,1)*1e6/2**30:.2f} GiB per million events kept")
PY
