#!/usr/bin/env bash
# How long `herald serve` takes to be ready again after a clean stop (SIGTERM) and after SIGKILL,
# with both group-journal files full. A clean stop checkpoints the log, so the start after it
# writes nothing back; after SIGKILL the start writes the journal's records back (it says how many).
#   load-tests/scenarios/restart.sh [ROUNDS] [EVENTS]
# Loopback only; every process is stopped on exit.
set -uo pipefail
ROUNDS=${1:-3}
EVENTS=${2:-40000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)
WORK=$(mktemp -d)
PORT=18281
SINK_PORT=19281
export HERALD_ADMIN_TOKEN=restart-admin-token-0123456789 HERALD_NETWORK_ALLOW=127.0.0.0/8 RUST_LOG=info
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
"$BIN/herald-sink" --listen 127.0.0.1:$SINK_PORT >/dev/null 2>&1 &
now() { date +%s.%N; }
since() { python3 -c "print('%.3f' % ($(now) - $1))"; }
# Starts Herald and waits (at most 60 s) until it is ready; sets `herald` and `took`.
start() {
  local t0
  t0=$(now)
  "$BIN/herald" serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" >"$WORK/out" 2>"$WORK/err" &
  herald=$!
  for _ in $(seq 1 6000); do curl -sf localhost:$PORT/readyz >/dev/null && { took=$(since "$t0"); return; }; sleep 0.01; done
  echo "herald was not ready within 60 s" >&2
  exit 1
}
for r in $(seq 1 "$ROUNDS"); do
  for sig in TERM KILL; do
    rm -rf "$WORK/data"
    start
    curl -sf -X POST localhost:$PORT/v1/subscriptions -H "authorization: Bearer $HERALD_ADMIN_TOKEN" \
      -H 'content-type: application/json' -d "{\"url\":\"http://127.0.0.1:$SINK_PORT/hook\"}" >/dev/null
    timeout 300 "$BIN/herald-load" --server http://127.0.0.1:$PORT --events "$EVENTS" --batch 100 --concurrency 8 --size 1024 >/dev/null ||
      { echo "publishing failed" >&2; exit 1; }
    t0=$(now)
    kill -$sig $herald
    wait $herald 2>/dev/null
    stopped=$(since "$t0")
    journal=$(du -sm "$WORK/data/log/journal" | cut -f1)
    start
    restored=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/err" "$WORK/out" | grep 'restored from the group journal' | grep -o 'records=[0-9]*' | head -1)
    echo "round $r, SIG$sig: stopped in ${stopped} s; ready again in ${took} s (journal ${journal} MiB; ${restored:-nothing written back})"
    kill -TERM $herald
    wait $herald 2>/dev/null
  done
done
