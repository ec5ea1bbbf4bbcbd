#!/usr/bin/env bash
# Edge relay throughput against direct delivery, in the same run.
#   load-tests/scenarios/edge.sh [EVENTS]      (default 50000)
# One subscription delivered directly by Herald, then one delivered through a `herald edge`
# agent on the same machine; 1 KB events, standard signing, a verifying sink. Reports
# deliveries/s of each and their ratio.
set -euo pipefail
EVENTS=${1:-50000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# E2E_BIN_DIR runs binaries built elsewhere (another commit, for a before/after pair).
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
WORK=$(mktemp -d)
PORT=18381
export HERALD_ADMIN_TOKEN=edge-admin-token-0123456789 HERALD_NETWORK_ALLOW=127.0.0.0/8 RUST_LOG=warn
SECRET=whsec_ZWRnZS1zZWNyZXQtZm9yLWhlcmFsZC10ZXN0aW5nLTE=
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)
api() { curl -sf -X "$1" "localhost:$PORT$2" -H "authorization: Bearer $HERALD_ADMIN_TOKEN" -H 'content-type: application/json' ${3:+-d "$3"}; }
field() { python3 -c "import json,sys;print(json.load(sys.stdin)['$1'])"; }

"$BIN/herald" serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" >"$WORK/herald.out" 2>"$WORK/herald.err" &
pids+=($!)
ready=0
for _ in $(seq 1 100); do curl -sf localhost:$PORT/readyz >/dev/null && { ready=1; break; }; sleep 0.1; done
[ $ready = 1 ] || { echo "herald was not ready within 10 s" >&2; exit 1; }
TOKEN=$(api POST /v1/edge-devices '{"name":"bench"}' | field token)
DEVICE=${TOKEN#he.}; DEVICE=${DEVICE%%.*}
HERALD_EDGE_TOKEN=$TOKEN "$BIN/herald" edge --server http://127.0.0.1:$PORT --window 512 >"$WORK/agent.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q connected "$WORK/agent.out" && break; sleep 0.1; done

run() { # name, sink port, extra subscription JSON
  "$BIN/herald-sink" --listen 127.0.0.1:$2 --secret "$SECRET" --expect "$EVENTS" >"$WORK/$1.json" 2>/dev/null &
  local sink=$!
  pids+=($sink)
  local sub
  sub=$(api POST /v1/subscriptions "{\"url\":\"http://127.0.0.1:$2/$1\",\"secret\":\"$SECRET\",\"events\":[\"$1\"]$3}" | field id)
  sleep 0.3
  "$BIN/herald-load" --server http://127.0.0.1:$PORT --events "$EVENTS" --batch 100 --concurrency 8 --size 1024 \
    --event-type "$1" >/dev/null
  timeout 300 tail --pid=$sink -f /dev/null
  api DELETE "/v1/subscriptions/$sub" >/dev/null || true
  echo "$1: $(cat "$WORK/$1.json")"
}
run direct 19381 ""
run edge 19382 ",\"via_edge\":\"$DEVICE\""
python3 - "$WORK/direct.json" "$WORK/edge.json" <<'PY'
import json, sys
d, e = (json.load(open(p))["deliveries_per_second"] for p in sys.argv[1:])
print(f"direct {d:.0f}/s, through the edge agent {e:.0f}/s: ratio {e / d:.2f}")
PY
