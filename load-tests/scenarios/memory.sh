#!/usr/bin/env bash
# What a subscription and a delivery in flight cost in memory.
#   load-tests/scenarios/memory.sh [SUBSCRIPTIONS] [HELD_SUBSCRIPTIONS]   (default 10000, 64)
# On a fresh embedded log, Herald's resident memory (median of 5 samples, 0.2 s apart) is read:
#   1. idle;
#   2. after SUBSCRIPTIONS subscriptions are created (each its own URL, one secret; 500 to a
#      tenant, t0, t1, ..., as a tenant may have 1,000 at most);
#   3. two seconds after one event has been delivered to every one of them: a burst of up to
#      SUBSCRIPTIONS requests at once, over as many connections as the pool opened, all closed
#      by then (the sink stops) — what stays is per-endpoint state plus what the allocator kept
#      from the burst;
#   4. while HELD_SUBSCRIPTIONS more subscriptions at a sink that answers after 10 s have their
#      64 default slots full: HELD_SUBSCRIPTIONS × 64 requests held open (`herald_in_flight`).
# Reports the per-subscription cost (stored; after the burst of first deliveries) and the
# per-in-flight cost.
# E2E_BIN_DIR runs binaries built elsewhere (another commit, for a before/after pair).
set -euo pipefail
SUBS=${1:-10000}
HELD=${2:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
WORK=$(mktemp -d)
PORT=18381
FAST=19381
SLOW=19382
export HERALD_ADMIN_TOKEN=memory-admin-token-0123456789abcd HERALD_NETWORK_ALLOW=127.0.0.0/8 RUST_LOG=warn
SECRET=whsec_bWVtb3J5LXNjZW5hcmlvLXNlY3JldC1mb3ItaGVyYWxk
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)

"$BIN/herald" serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" >"$WORK/herald.out" 2>"$WORK/herald.err" &
herald=$!
pids+=($herald)
for _ in $(seq 1 300); do curl -sf localhost:$PORT/readyz >/dev/null && break; sleep 0.1; done

# Resident memory in KiB: the median of five samples, so one allocation burst does not decide.
rss() {
  for _ in 1 2 3 4 5; do awk '/VmRSS/ {print $2}' /proc/$herald/status; sleep 0.2; done | sort -n | sed -n 3p
}
# Creates $2 subscriptions whose URLs start with $1, for event type $3, in $4 tenants (t0, t1,
# ... in turn), over one kept-alive connection.
subscribe() {
  python3 - "$PORT" "$HERALD_ADMIN_TOKEN" "$SECRET" "$1" "$2" "$3" "$4" <<'PY'
import http.client, json, sys
port, token, secret, url, n, kind, tenants = sys.argv[1:8]
n, tenants = int(n), int(tenants)
conn = http.client.HTTPConnection("127.0.0.1", int(port))
headers = {"authorization": "Bearer " + token, "content-type": "application/json"}
for i in range(n):
    body = json.dumps({"url": "%s/%d" % (url, i), "secret": secret, "events": [kind], "tenant": "t%d" % (i % tenants)})
    conn.request("POST", "/v1/subscriptions", body, headers)
    r = conn.getresponse()
    r.read()
    assert r.status == 201, (r.status, i)
PY
}
# The sum of a gauge over its series, from /metrics.
gauge() { curl -sf localhost:$PORT/metrics | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'; }

idle=$(rss)
TENANTS=$(( (SUBS + 499) / 500 ))
subscribe "http://127.0.0.1:$FAST/hook" "$SUBS" Fanout "$TENANTS"
stored=$(rss)

"$BIN/herald-sink" --listen 127.0.0.1:$FAST --secret "$SECRET" --expect "$SUBS" >"$WORK/fast.json" 2>"$WORK/fast.err" &
sink=$!
pids+=($sink)
sleep 0.3
# One event for each tenant: every subscription gets one delivery.
"$BIN/herald-load" --server http://127.0.0.1:$PORT --events "$TENANTS" --tenants "$TENANTS" --batch 1 --event-type Fanout >/dev/null
timeout 120 tail --pid=$sink -f /dev/null
sleep 2
delivered=$(rss)
conns=$(ss -tnH state established "( dport = :$FAST )" | wc -l)

"$BIN/herald-sink" --listen 127.0.0.1:$SLOW --latency-ms 10000-10000 >/dev/null 2>"$WORK/slow.err" &
pids+=($!)
subscribe "http://127.0.0.1:$SLOW/hook" "$HELD" Held 1
before_held=$(rss)
"$BIN/herald-load" --server http://127.0.0.1:$PORT --events 64 --tenants 1 --batch 64 --event-type Held >/dev/null
want=$((HELD * 64))
in_flight=0
for _ in $(seq 1 80); do
  in_flight=$(gauge herald_in_flight)
  [ "${in_flight%.*}" -ge "$want" ] && break
  sleep 0.1
done
held=$(rss)

echo "sink:          $(cat "$WORK/fast.json")"
echo "herald RSS:    idle $((idle / 1024)) MiB; $SUBS subscriptions stored $((stored / 1024)) MiB; each delivered to once $((delivered / 1024)) MiB ($conns connections to the sink kept)"
echo "               $HELD more at a slow sink $((before_held / 1024)) MiB; $in_flight of $want requests in flight $((held / 1024)) MiB"
python3 - "$idle" "$stored" "$delivered" "$before_held" "$held" "$SUBS" "$in_flight" <<'PY'
import sys
idle, stored, delivered, before, held, subs, flying = (float(a) for a in sys.argv[1:])
print("per subscription: %.2f KiB stored; %.2f KiB after the burst of first deliveries" % ((stored - idle) / subs, (delivered - idle) / subs))
print("per request in flight: %.2f KiB" % ((held - before) / max(flying, 1)))
PY
