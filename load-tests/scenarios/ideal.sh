# Sourced by the scenarios that compare Herald with the ideal signed loop in the same run.
# ideal_loop PORT SECRET REQUESTS REPORT: signs and POSTs REQUESTS 1 KB bodies with herald-ideal
# straight into a verifying sink on PORT (no log, no queue), waits for the sink to count them,
# prints their rate as the sink measured it (first to last arrival: the clock Herald's rate is
# taken by) and leaves the sink's report in REPORT; fails when the loop or the sink did.
ideal_loop() {
  "$BIN/herald-sink" --listen "127.0.0.1:$1" --secret "$2" --expect "$3" >"$4" 2>/dev/null &
  local sink=$!
  sleep 0.3
  "$BIN/herald-ideal" --url "http://127.0.0.1:$1/hook" --secret "$2" --requests "$3" >/dev/null ||
    { kill $sink 2>/dev/null; wait $sink 2>/dev/null; echo "the ideal loop failed" >&2; return 1; }
  timeout 60 tail --pid=$sink -f /dev/null || true
  kill $sink 2>/dev/null || true
  wait $sink 2>/dev/null || true
  checked_rate "$4" "$3"
}

# checked_rate REPORT EXPECTED: a verifying sink's deliveries/s, once its report shows every
# expected delivery and no bad signature (else a message and failure: no rate from a broken run).
checked_rate() {
  python3 - "$1" "$2" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit("no sink report in %s: not every delivery arrived" % sys.argv[1])
if r["bad_signatures"] or r["distinct"] < int(sys.argv[2]):
    sys.exit("sink report %s: %d of %s deliveries, %d bad signatures" % (sys.argv[1], r["distinct"], sys.argv[2], r["bad_signatures"]))
print(round(r["deliveries_per_second"]))
PY
}

# deferrals PORT: what Herald on PORT deferred to the retry tiers at an in-flight cap, and for a
# slow endpoint's pace (each an append and a read again: work the ideal loop never does), and
# the retries it scheduled.
deferrals() {
  curl -sf "localhost:$1/metrics" | awk '/^herald_deliveries_deferred_total\{.*in_flight_cap/ { d += $NF }
    /^herald_deliveries_deferred_total\{.*endpoint_pace/ { p += $NF }
    /^herald_retries_scheduled_total/ { r += $NF }
    END { printf "deferred: %d at the in-flight cap, %d for an endpoint'"'"'s pace, %d retries scheduled\n", d, p, r }'
}
