#!/usr/bin/env bash
# The headline figures of BENCHMARKS.md from one run, history off and on alternated, so every
# ratio compares figures taken minutes apart on the same (shared, noisy) machine:
#   load-tests/scenarios/report.sh [ROUNDS]        (default 2; about 12 minutes a round)
# Each round runs, history off then on: end to end (8 subscriptions, 200,000 deliveries, batches
# of 100), end to end with one event per request (64 producers), end to end on Kafka (tansu, in
# memory; `cargo install tansu` first) and a drain of 1,000,000 queued deliveries; then steady
# latency at half of that round's single-event peak (its history-off e2e-single rate / 8
# subscriptions / 2), off and on. Every throughput run measures the ideal signed loop (and wrk)
# itself, right after, with Herald stopped. A run that fails (a delivery missing, a bad
# signature) gets a FAILED row, is left out of the ratios, and makes the script exit 1.
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

failed=0
# failure NAME HISTORY LOG: a FAILED row, and the script's exit status.
failure() {
  echo "$1 failed: $3" >&2
  printf '%s\t%s\t%s\tFAILED\t-\t-\t-\t-\t-\t-\n' "$round" "$1" "$2" >>"$rows"
  failed=1
}

# e2e NAME HISTORY [ENV...]: one e2e.sh run; appends "round name history rate ideal wrk cpu_us"
# (the CPU once the history index has caught up: indexing owed after the last delivery counts).
e2e() {
  local name=$1 history=$2 log="$OUT/$1-$2-$round.log"
  shift 2
  env HERALD_HISTORY_RETENTION="$history" "$@" "$S/e2e.sh" 8 200000 >"$log" 2>&1 || { failure "$name" "$history" "$log"; return; }
  local rate ideal wrk cpu
  rate=$(awk '/^herald:/ {print $2}' "$log")
  ideal=$(awk '/^ideal:/ {print $2}' "$log")
  wrk=$(awk '/^wrk:/ {print $2}' "$log")
  cpu=$(awk '/once the history index caught up/ {print $1}' "$log")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\n' "$round" "$name" "$history" "$rate" "$ideal" "$wrk" "$cpu" >>"$rows"
}

backlog() {
  local history=$1 log="$OUT/backlog-$1-$round.log"
  HERALD_HISTORY_RETENTION=$history "$S/backlog.sh" 1000000 >"$log" 2>&1 || { failure "backlog 1 M" "$history" "$log"; return; }
  local drain ideal hwm
  drain=$(sed -n 's/.*(drain \([0-9]*\) deliveries.*/\1/p' "$log")
  ideal=$(awk '/^ideal:/ {print $2}' "$log")
  hwm=$(sed -n 's/.*high-water mark \([0-9]*\) MiB.*/\1/p' "$log")
  printf '%s\tbacklog 1 M\t%s\t%s\t%s\t-\t-\t-\t-\t%s\n' "$round" "$history" "$drain" "$ideal" "$hwm" >>"$rows"
}

# steady HISTORY RATE: single events at RATE a second, latency percentiles.
steady() {
  local history=$1 rate=$2 dir="$OUT/steady-$1-$round"
  timeout 600 env HERALD_HISTORY_RETENTION="$history" "$BIN/herald-scenario" --herald "$BIN/herald" --scenario steady \
    --rate "$rate" --batch 1 --concurrency 32 --baseline 0 --out "$dir" >"$dir.log" 2>&1 ||
    { failure "steady $rate single/s" "$history" "$dir.log"; return; }
  python3 - "$dir/report.json" "$history" "$round" "$rate" >>"$rows" <<'PY' || failure "steady $rate single/s" "$history" "$dir"
import json, sys
r = json.load(open(sys.argv[1]))
s = next(x for x in (r if isinstance(r, list) else [r]) if x.get("scenario") == "steady")
if s["lost"] or s["bad_signatures"]:
    sys.exit("%d lost, %d bad signatures" % (s["lost"], s["bad_signatures"]))
lat = s["latency_ms"]
print("%s\tsteady %s single/s\t%s\t%d\t-\t-\t-\t%s\t%s\t%d" % (sys.argv[3], sys.argv[4], sys.argv[2],
      s["deliveries_per_second"], lat["p50"], lat["p99"], s["herald_peak_rss_mib"]))
PY
}

for round in $(seq 1 "$ROUNDS"); do
  for h in 0s P14D; do
    # Each run starts with the previous one's files written back (a drain leaves a gigabyte
    # of log behind, whose writeback would land in the next run's latencies).
    sync; e2e e2e-batches "$h"
    sync; e2e e2e-single "$h" E2E_BATCH=1 E2E_CONCURRENCY=64
    sync; e2e e2e-kafka "$h" BACKEND=kafka
    sync; backlog "$h"
  done
  # Half of this round's single-event peak: its history-off deliveries/s over 8 subscriptions.
  peak=$(awk -F'\t' -v r="$round" '$1 == r && $2 == "e2e-single" && $3 == "0s" && $4 != "FAILED" {print $4}' "$rows")
  if [ -n "$peak" ]; then
    for h in 0s P14D; do sync; steady "$h" $(( peak / 8 / 2 )); done
  else
    failure "steady (no single-event peak this round)" - "$OUT"
  fi
done

python3 - "$rows" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
number = lambda v: v not in ("-", "", "FAILED")
print("| Round | Run | History | Deliveries/s | Ideal loop/s | Herald / ideal | wrk/s | CPU µs/delivery | p50 ms | p99 ms | RSS MiB |")
print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for rnd, name, h, rate, ideal, wrk, cpu, p50, p99, rss in rows:
    ratio = "%.2f" % (float(rate) / float(ideal)) if number(ideal) and number(rate) else "-"
    print(f"| {rnd} | {name} | {'on' if h == 'P14D' else 'off' if h == '0s' else '-'} | {rate} | {ideal} | {ratio} | {wrk} | {cpu} | {p50} | {p99} | {rss} |")
# History on against off: the two runs of one kind in one round, never across rounds.
by = collections.defaultdict(dict)
for rnd, name, h, rate, *_ in rows:
    by[(name, rnd)][h] = rate
ratios = collections.defaultdict(list)
for (name, rnd), runs in by.items():
    if not name.startswith("steady") and number(runs.get("0s", "-")) and number(runs.get("P14D", "-")):
        ratios[name].append(float(runs["P14D"]) / float(runs["0s"]))
print()
for name, pairs in ratios.items():
    print(f"{name}: history on / off = " + ", ".join("%.2f" % p for p in pairs) + " (mean %.2f)" % (sum(pairs) / len(pairs)))
PY
echo "raw outputs: $OUT"
exit $failed
