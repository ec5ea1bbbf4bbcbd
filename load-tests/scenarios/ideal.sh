# Sourced by the scenarios that compare Herald with the ideal signed loop in the same run.
# ideal_loop PORT SECRET REQUESTS REPORT: signs and POSTs REQUESTS 1 KB bodies with herald-ideal
# straight into a verifying sink on PORT (no log, no queue), waits for the sink to count them,
# prints the loop's requests/s, and leaves the sink's report (bad signatures…) in REPORT.
ideal_loop() {
  "$BIN/herald-sink" --listen "127.0.0.1:$1" --secret "$2" --expect "$3" >"$4" 2>/dev/null &
  local sink=$!
  sleep 0.3
  "$BIN/herald-ideal" --url "http://127.0.0.1:$1/hook" --secret "$2" --requests "$3" |
    python3 -c "import json,sys;print(round(json.load(sys.stdin)['requests_per_second']))"
  timeout 30 tail --pid=$sink -f /dev/null || true
  kill $sink 2>/dev/null || true
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
