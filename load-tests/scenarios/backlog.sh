#!/usr/bin/env bash
# Memory while a large backlog drains.
#   load-tests/scenarios/backlog.sh [EVENTS]      (default 5000000)
# Creates one subscription on a fresh embedded log, stops Herald, appends EVENTS delivery
# records (1 KB events) straight into its log with `herald-load --direct-embedded`, then
# starts Herald with a verifying sink and samples Herald's resident memory every second until
# the sink has every event. Reports peak RSS, the drain rate, and loss/duplicates; then runs the
# ideal signed loop (herald-ideal, no log) in the same run and prints the drain's ratio to it.
# E2E_BIN_DIR runs binaries built elsewhere (another commit, for a before/after pair).
set -euo pipefail
EVENTS=${1:-5000000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
. "$ROOT/load-tests/scenarios/ideal.sh"
WORK=$(mktemp -d)
PORT=18281
SINK_PORT=19281
export HERALD_ADMIN_TOKEN=backlog-admin-token-0123456789 HERALD_NETWORK_ALLOW=127.0.0.0/8 RUST_LOG=warn
SECRET=whsec_YmFja2xvZy1zZWNyZXQtZm9yLWhlcmFsZC10ZXN0cw==
pids=()
# Waits for every process before removing their files (Herald checkpoints at a stop).
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)

start_herald() {
  "$BIN/herald" serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" >"$WORK/herald.out" 2>"$WORK/herald.err" &
  herald=$!
  pids+=($herald)
  for _ in $(seq 1 300); do curl -sf localhost:$PORT/readyz >/dev/null && return; sleep 0.1; done
  echo "herald was not ready within 30 s" >&2
  exit 1
}
start_herald
SUB=$(curl -sf -X POST localhost:$PORT/v1/subscriptions -H "authorization: Bearer $HERALD_ADMIN_TOKEN" \
  -H 'content-type: application/json' -d "{\"url\":\"http://127.0.0.1:$SINK_PORT/hook\",\"secret\":\"$SECRET\"}" |
  python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
kill -TERM $herald; wait $herald || true

echo "appending $EVENTS delivery records into the stopped server's log ..."
"$BIN/herald-load" --direct-embedded "$WORK/data" --subscription "$SUB" --events "$EVENTS" --size 1024 --concurrency 4
echo "log on disk: $(du -sh "$WORK/data/log" | cut -f1)"

# SINK_LATENCY_MS (e.g. 10-10) makes the receiver answer that slowly: a backlog to an endpoint
# slower than the window's worth of slots, where admission defers what would wait too long.
"$BIN/herald-sink" --listen 127.0.0.1:$SINK_PORT --secret "$SECRET" --expect "$EVENTS" \
  ${SINK_LATENCY_MS:+--latency-ms "$SINK_LATENCY_MS"} >"$WORK/sink.json" 2>"$WORK/sink.err" &
sink=$!
pids+=($sink)
sleep 0.3
start_herald
peak=0
samples=()
# At most DRAIN_DEADLINE seconds (default one per 1,000 events, at least 10 minutes): a lost
# delivery or a crashed Herald ends the run with an error instead of never.
deadline=$(( SECONDS + ${DRAIN_DEADLINE:-$(( EVENTS / 1000 > 600 ? EVENTS / 1000 : 600 ))} ))
while kill -0 $sink 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { echo "the backlog did not drain in time: $(cat "$WORK/sink.err" | tail -1)" >&2; exit 1; }
  rss=$(awk '/VmRSS/ {print $2}' /proc/$herald/status 2>/dev/null || echo 0)
  samples+=($rss)
  [ "$rss" -gt "$peak" ] && peak=$rss
  sleep 1
done
hwm=$(awk '/VmHWM/ {print $2}' /proc/$herald/status)
# Herald's CPU time (user + system) since its restart: steadier than the rate on a shared box.
herald_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' /proc/$herald/stat)
echo "sink:   $(cat "$WORK/sink.json")"
echo "herald RSS while draining: peak sampled $((peak / 1024)) MiB, high-water mark $((hwm / 1024)) MiB, ${#samples[@]} samples"
python3 -c "print('cpu:    %s s of Herald CPU, %.1f µs per delivery' % ('$herald_cpu', $herald_cpu * 1e6 / $EVENTS))"
echo "RSS samples (MiB, 1/s): $(for s in "${samples[@]}"; do printf '%d ' $((s / 1024)); done)"
deferrals $PORT
drain=$(checked_rate "$WORK/sink.json" "$EVENTS")
# The ideal signed loop in the same run, with the machine to itself: Herald stopped (its clean
# stop writes a checkpoint) and its writes on disk.
kill $herald 2>/dev/null || true
wait $herald 2>/dev/null || true
sync
IDEAL=$(( EVENTS < 1000000 ? EVENTS : 1000000 ))
ideal=$(ideal_loop $((SINK_PORT + 1)) "$SECRET" "$IDEAL" "$WORK/ideal-sink.json")
echo "ideal:  $ideal signed POSTs/s (herald-ideal, 1 KB, 64 connections, no log)"
python3 -c "print('ratio:  %.2f of the ideal signed loop (drain %d deliveries/s)' % ($drain / $ideal, $drain))"
