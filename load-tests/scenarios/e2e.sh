#!/usr/bin/env bash
# End-to-end throughput on this machine, against a baseline measured in the same run.
#   load-tests/scenarios/e2e.sh [SUBSCRIPTIONS] [EVENTS]
#   BACKEND=kafka load-tests/scenarios/e2e.sh ...   (on a local tansu broker, in memory)
#   ORDERED_KEYS=1000 load-tests/scenarios/e2e.sh ... (ordered subscriptions, events over 1000 keys)
#   E2E_BATCH=1 E2E_CONCURRENCY=64 load-tests/scenarios/e2e.sh ... (one event per request, 64 producers)
#   E2E_MAX_IN_FLIGHT=8 load-tests/scenarios/e2e.sh ... (each subscription's in-flight cap; at the
#     default, 64, 8 subscriptions may hold 512 connections to the sink, against the loop's 64)
#   E2E_RANDOM_PAD=1 load-tests/scenarios/e2e.sh ... (each event padded with random letters and
#     digits of its own, which nothing compresses, instead of a run of x shared by all)
#   E2E_SPREAD=1 load-tests/scenarios/e2e.sh 8 ... (each subscription its own tenant's, each event
#     for one of them: EVENTS events of one delivery each, as in #20's Svix comparison)
# Starts a release Herald on a fresh embedded log (or Kafka), a verifying sink, creates SUBSCRIPTIONS
# subscriptions (standard signing, 1 KB events), publishes EVENTS/SUBSCRIPTIONS events through
# the batch API and reports deliveries/s, then what wrk pushes straight into the same sink.
# Loopback only; every process is stopped on exit.
set -euo pipefail
SUBS=${1:-8}
EVENTS=${2:-200000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# E2E_BIN_DIR runs binaries built elsewhere (another commit, for a before/after pair).
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
. "$ROOT/load-tests/scenarios/ideal.sh"
WORK=$(mktemp -d)
HERALD_PORT=18181
SINK_PORT=19100
export HERALD_ADMIN_TOKEN=e2e-admin-token-0123456789 HERALD_NETWORK_ALLOW=127.0.0.0/8 RUST_LOG=warn
pids=()
# Waits for every process to end, so the next run's tansu can bind its port (a broker that
# held a run's records takes a while to exit, and a probe would reach it instead).
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; [ -s "$WORK/herald.err" ] && sed '/^Stack backtrace:/q' "$WORK/herald.err" | grep -v "INFO" | head -12 >&2; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)

if [ "${BACKEND:-embedded}" = kafka ]; then
  TANSU=${HERALD_TANSU:-${CARGO_HOME:-$HOME/.cargo}/bin/tansu}
  [ -x "$TANSU" ] || { echo "tansu is not installed: cargo install tansu --locked --features dynostore,libsql" >&2; exit 1; }
  "$TANSU" broker --listener-url tcp://127.0.0.1:19192 --advertised-listener-url tcp://127.0.0.1:19192 \
    --storage-engine memory://tansu/ >"$WORK/tansu.out" 2>&1 &
  tansu=$!
  pids+=($tansu)
  for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/19192) 2>/dev/null && break; sleep 0.1; done
  (echo > /dev/tcp/127.0.0.1/19192) 2>/dev/null || { echo "tansu did not start within 10 s" >&2; exit 1; }
  export HERALD_LOG_BACKEND=kafka HERALD_LOG_BROKERS=127.0.0.1:19192 HERALD_LOG_REPLICATION=1
fi

"$BIN/herald" serve --listen 127.0.0.1:$HERALD_PORT --data-dir "$WORK/data" >"$WORK/herald.out" 2>"$WORK/herald.err" &
herald=$!
pids+=($herald)
ready=0
for _ in $(seq 1 100); do curl -sf localhost:$HERALD_PORT/healthz >/dev/null && { ready=1; break; }; sleep 0.1; done
[ $ready = 1 ] || { echo "herald did not start within 10 s" >&2; exit 1; }
# One known secret for every subscription, so the sink verifies every signature.
# Fields every subscription gets besides its URL and secret.
FIELDS=""
SPREAD=${E2E_SPREAD:-0}
[ "${ORDERED_KEYS:-0}" -gt 0 ] && FIELDS=',"ordering":{"mode":"key"}'
[ -n "${E2E_MAX_IN_FLIGHT:-}" ] && FIELDS="$FIELDS,\"max_in_flight\":$E2E_MAX_IN_FLIGHT"
SECRET=$(python3 -c "import base64,os;print('whsec_'+base64.b64encode(os.urandom(24)).decode())")
for i in $(seq 1 "$SUBS"); do
  TENANT=""
  [ "$SPREAD" = 1 ] && TENANT=",\"tenant\":\"t$((i - 1))\""
  curl -sf -X POST localhost:$HERALD_PORT/v1/subscriptions -H "authorization: Bearer $HERALD_ADMIN_TOKEN" \
    -H 'content-type: application/json' -d "{\"url\":\"http://127.0.0.1:$SINK_PORT/hook$i\",\"secret\":\"$SECRET\"$FIELDS$TENANT}" |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])' >>"$WORK/subscriptions"
done
# Where the subscriptions' deliveries go: their ids are random, and how many partitions they
# fill (and so how many partition windows of records wait at once) changes a run's CPU.
layout=$(python3 "$(dirname "$0")/partitions.py" "${HERALD_LOG_PARTITIONS:-8}" <"$WORK/subscriptions")
"$BIN/herald-sink" --listen 127.0.0.1:$SINK_PORT --secret "$SECRET" --expect "$EVENTS" >"$WORK/sink.json" 2>"$WORK/sink.err" &
sink=$!
pids+=($sink)
sleep 0.3
if [ "$SPREAD" = 1 ]; then PUBLISH=(--events "$EVENTS" --tenants "$SUBS"); else PUBLISH=(--events $((EVENTS / SUBS))); fi
[ "${E2E_RANDOM_PAD:-0}" = 1 ] && PUBLISH+=(--random-pad)
timeout 600 "$BIN/herald-load" --server http://127.0.0.1:$HERALD_PORT "${PUBLISH[@]}" --batch "${E2E_BATCH:-100}" --concurrency "${E2E_CONCURRENCY:-8}" --size 1024 --keys "${ORDERED_KEYS:-0}" >"$WORK/load.json"
timeout 300 tail --pid=$sink -f /dev/null
# Herald's CPU time (user + system) for the whole run: less noisy than a rate on a shared box.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' /proc/${1:-$herald}/stat; }
herald_cpu=$(cpu)
# On Kafka the broker shares the cores: its CPU is part of what a delivery costs the machine.
[ -n "${tansu:-}" ] && tansu_cpu=$(cpu "$tansu")
# The same per thread (tokio-rt-worker, herald-log-writ, history-index, fjall:worker), then
# again once the history index has caught up (its lag at 0), so indexing done after the last
# delivery is counted too.
threads() { for t in /proc/$herald/task/*; do echo "$(cat "$t/comm") $(cut -d' ' -f14,15 "$t/stat")"; done |
  awk -v hz="$(getconf CLK_TCK)" '{ c[$1] += ($2 + $3) / hz } END { for (k in c) printf "%s %.2f s, ", k, c[k] }'; }
herald_threads=$(threads)
# A rate only from a run where every delivery arrived with a good signature.
herald_rate=$(checked_rate "$WORK/sink.json" "$EVENTS")
caught_up=no
waited=$(date +%s.%N)
for _ in $(seq 1 600); do
  lag=$(curl -sf localhost:$HERALD_PORT/metrics | awk '/^herald_history_lag / {print $2}')
  [ "${lag:-0}" = 0 ] && { caught_up=yes; break; }; sleep 0.1
done
catch_up=$(python3 -c "import time;print('%.1f' % (time.time() - $waited))")
herald_cpu_caught_up=$(cpu)
[ -n "${tansu:-}" ] && tansu_cpu_caught_up=$(cpu "$tansu")
echo "load:   $(cat "$WORK/load.json")"
echo "sink:   $(cat "$WORK/sink.json")"
deferrals $HERALD_PORT
# The baselines get the machine to themselves: Herald (its flusher, compaction, the history
# index) and the broker stopped, their writes on disk.
kill $herald ${tansu:-} 2>/dev/null || true
wait $herald ${tansu:-} 2>/dev/null || true
sync

# Baseline: the same sink, the same kind of body, pushed by wrk with no Herald in between.
"$BIN/herald-sink" --listen 127.0.0.1:$((SINK_PORT + 1)) >/dev/null 2>&1 &
pids+=($!)
python3 - "$WORK/post.lua" <<'PY'
import json, sys
body = json.dumps({"id": "evt_x", "event": "LoadTest", "tenant": "default", "data": {"n": 1, "pad": "x" * 1000},
                   "deliveryAttempt": 1, "pendingRetries": 184, "sentAt": "2026-01-01T00:00:00.000Z"})
open(sys.argv[1], "w").write('wrk.method="POST"\nwrk.body=[[%s]]\nwrk.headers["Content-Type"]="application/json"\n' % body)
PY
sleep 0.3
wrk_rate=$(wrk -t2 -c64 -d5s -s "$WORK/post.lua" http://127.0.0.1:$((SINK_PORT + 1))/hook | awk '/Requests\/sec/ {print int($2)}')
# The ideal signed loop: sign and POST straight into a verifying sink, no log (herald-ideal).
ideal_rate=$(ideal_loop $((SINK_PORT + 2)) "$SECRET" "$EVENTS" "$WORK/ideal-sink.json")
echo "herald: $herald_rate deliveries/s ($SUBS subscriptions, standard signing, 1 KB events)"
echo "layout: $layout"
python3 -c "print('cpu:    %s s of Herald CPU, %.1f µs per delivery' % ('$herald_cpu', $herald_cpu * 1e6 / $EVENTS))"
echo "        by thread: ${herald_threads%, }"
python3 -c "print('        %.1f µs per delivery once the history index caught up (%s, %s s after the last delivery)' % ($herald_cpu_caught_up * 1e6 / $EVENTS, '$caught_up', '$catch_up'))"
[ -n "${tansu:-}" ] && python3 -c "print('broker: %s s of tansu CPU, %.1f µs per delivery (%.1f once the index caught up)' % ('$tansu_cpu', $tansu_cpu * 1e6 / $EVENTS, $tansu_cpu_caught_up * 1e6 / $EVENTS))"
echo "wrk:    $wrk_rate requests/s straight into the sink"
python3 -c "print('ratio:  %.2f of what this machine pushes over HTTP at all' % ($herald_rate / $wrk_rate))"
echo "ideal:  $ideal_rate signed POSTs/s (herald-ideal: Standard Webhooks, 1 KB, 64 connections, no log; every signature verified)"
python3 -c "print('ratio:  %.2f of the ideal signed loop' % ($herald_rate / $ideal_rate))"
