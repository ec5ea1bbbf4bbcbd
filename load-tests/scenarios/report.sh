#!/usr/bin/env bash
# The headline figures of BENCHMARKS.md from one run, history off and on alternated, so every
# ratio compares figures taken minutes apart on the same (shared, noisy) machine:
#   load-tests/scenarios/report.sh [ROUNDS]        (default 2; about 11 minutes a round)
# Each round runs, history off then on: steady latency at 1,300 single events/s, end to end (8
# subscriptions, 200,000 deliveries, batches of 100), end to end with one event per request (64
# producers), end to end on Kafka (tansu, in memory) and a drain of 1,000,000 queued deliveries.
# Every throughput run measures the ideal signed loop (and wrk) itself, right after.
# Prints one Markdown table row per run, then the on/off ratios; raw outputs stay in OUT.
set -euo pipefail
ROUNDS=${1:-2}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${E2E_BIN_DIR:-$ROOT/target/release}
OUT=${REPORT_OUT:-$(mktemp -d)}
[ -n "${E2E_BIN_DIR:-}" ] || (cd "$ROOT" && cargo build --release --locked -q -p herald -p herald-load-tests --bins)
export E2E_BIN_DIR=$BIN
S=$ROOT/load-tests/scenarios
rows=$OUT/rows.tsv
: >"$rows"

# e2e NAME HISTORY [ENV...]: one e2e.sh run; appends "name history rate ideal wrk cpu_us".
e2e() {
  local name=$1 history=$2 log="$OUT/$1-$2-$round.log"
  shift 2
  env HERALD_HISTORY_RETENTION="$history" "$@" "$S/e2e.sh" 8 200000 >"$log" 2>&1 || { echo "$name failed: $log" >&2; return; }
  local rate ideal wrk cpu
  rate=$(awk '/^herald:/ {print $2}' "$log")
  ideal=$(awk '/^ideal:/ {print $2}' "$log")
  wrk=$(awk '/^wrk:/ {print $2}' "$log")
  cpu=$(awk '/^cpu:/ {print $7}' "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\n' "$name" "$history" "$rate" "$ideal" "$wrk" "$cpu" >>"$rows"
}

backlog() {
  local history=$1 log="$OUT/backlog-$1-$round.log"
  HERALD_HISTORY_RETENTION=$history "$S/backlog.sh" 1000000 >"$log" 2>&1 || { echo "backlog failed: $log" >&2; return; }
  local drain ideal hwm
  drain=$(sed -n 's/.*(drain \([0-9]*\) deliveries.*/\1/p' "$log")
  ideal=$(awk '/^ideal:/ {print $2}' "$log")
  hwm=$(sed -n 's/.*high-water mark \([0-9]*\) MiB.*/\1/p' "$log")
  printf 'backlog 1 M\t%s\t%s\t%s\t-\t-\t-\t-\t%s\n' "$history" "$drain" "$ideal" "$hwm" >>"$rows"
}

steady() {
  local history=$1 dir="$OUT/steady-$1-$round"
  HERALD_HISTORY_RETENTION=$history "$BIN/herald-scenario" --herald "$BIN/herald" --scenario steady --rate 1300 \
    --batch 1 --concurrency 32 --baseline 0 --out "$dir" >"$dir.log" 2>&1 || { echo "steady failed: $dir.log" >&2; return; }
  python3 - "$dir/report.json" "$history" >>"$rows" <<'PY' || echo "steady: no report in $dir" >&2
import json, sys
r = json.load(open(sys.argv[1]))
s = next(x for x in (r if isinstance(r, list) else [r]) if x.get("scenario") == "steady")
lat = s["latency_ms"]
print("steady 1,300 single/s\t%s\t%d\t-\t-\t-\t%s\t%s\t%d" % (sys.argv[2], s["deliveries_per_second"],
      lat["p50"], lat["p99"], s["herald_peak_rss_mib"]))
PY
}

for round in $(seq 1 "$ROUNDS"); do
  for h in 0s P14D; do
    # Each run starts with the previous one's files written back (a drain leaves a gigabyte
    # of log behind, whose writeback would land in the next run's latencies).
    sync; steady "$h"
    sync; e2e e2e-batches "$h"
    sync; e2e e2e-single "$h" E2E_BATCH=1 E2E_CONCURRENCY=64
    sync; e2e e2e-kafka "$h" BACKEND=kafka
    sync; backlog "$h"
  done
done

python3 - "$rows" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| Run | History | Deliveries/s | Ideal loop/s | Herald / ideal | wrk/s | CPU µs/delivery | p50 ms | p99 ms | RSS MiB |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, h, rate, ideal, wrk, cpu, p50, p99, rss in rows:
    ratio = "%.2f" % (float(rate) / float(ideal)) if ideal not in ("-", "") and rate not in ("-", "") else "-"
    print(f"| {name} | {'on' if h != '0s' else 'off'} | {rate} | {ideal} | {ratio} | {wrk} | {cpu} | {p50} | {p99} | {rss} |")
# History on against off, each pair of the same round (rows come off, on, off, on... per kind).
by = collections.defaultdict(list)
for name, h, rate, *_ in rows:
    by[name].append((h, rate))
print()
for name, runs in by.items():
    if name.startswith("steady"):
        continue  # a fixed rate: its latencies are in the table
    pairs = [(float(b[1]) / float(a[1])) for a, b in zip(runs[0::2], runs[1::2]) if a[1] not in ("-", "") and b[1] not in ("-", "")]
    if pairs:
        print(f"{name}: history on / off = " + ", ".join("%.2f" % p for p in pairs) + " (mean %.2f)" % (sum(pairs) / len(pairs)))
PY
echo "raw outputs: $OUT"
