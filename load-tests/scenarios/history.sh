#!/usr/bin/env bash
# The delivery history at scale: fills a data directory's history index with ATTEMPTS attempts
# (two per event, over 1000 subscriptions of 10 tenants, spread over the last 7 days), starts a
# release Herald on it, and times GET /v1/attempts?event= and ?subscription=&limit=100 (p50, p99,
# max over 1000 requests each), with the index's bytes on disk per attempt.
#   load-tests/scenarios/history.sh [ATTEMPTS]      (default 10 000 000)
set -euo pipefail
ATTEMPTS=${1:-10000000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
WORK=$(mktemp -d)
PORT=18191
export HERALD_ADMIN_TOKEN=history-admin-token-0123456789 RUST_LOG=warn
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)

echo "fill:  $("$BIN/herald-history" fill --data-dir "$WORK/data" --attempts "$ATTEMPTS")"
"$BIN/herald" serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" >"$WORK/herald.out" 2>"$WORK/herald.err" &
pids+=($!)
for _ in $(seq 1 300); do curl -sf localhost:$PORT/healthz >/dev/null && break; sleep 0.1; done
echo "query: $("$BIN/herald-history" query --server http://127.0.0.1:$PORT --token "$HERALD_ADMIN_TOKEN" \
  --data-dir "$WORK/data" --attempts "$ATTEMPTS")"
