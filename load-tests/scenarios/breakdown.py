#!/usr/bin/env python3
"""Where a delivery's CPU goes, from a call-graph profile of Herald (or of herald-ideal).

    perf record -F 499 --call-graph dwarf,16384 -p <pid> -o herald.perf -- sleep 4
    perf script -i herald.perf -F comm,ip,sym | load-tests/scenarios/breakdown.py [--us MICROSECONDS]

A sample of a thread other than tokio's runtime goes to a row of that thread. A runtime
sample goes to the first entry of ROWS below with any of its patterns in any frame of the
sample's stack (so a signature computed inside a send counts as signing, not as the send);
the API's row is matched first, and the writev row takes a client connection's frames
together with the writev system call. The last row matches every runtime stack (tokio's
worker loop is at the base of each), so it is also what is left. With --us (CPU µs per
delivery of the whole run, as backlog.sh and e2e.sh print it), each row is also given in µs
per delivery: one run's shares, which move between runs. BENCHMARKS.md, "Taking a CPU
profile", has a table made this way for Herald and for the ideal loop.
"""
import argparse
import collections
import signal
import sys

# An HTTP client connection's task, and hyper's server side (the API), told apart first.
CONNECTION = ("client::conn::http1::upgrades::UpgradeableConnection", "dispatch::Client<",
              "role::Client")
API = ("dispatch::Server", "role::Server", "server::conn::http1", "herald::api::",
       "herald::ingest")
WRITEV = ("__GI___writev", "do_writev", "vfs_writev", "tcp_sendmsg")

SIGNING = "body, signature, headers"
READING = "reading the log, starting deliveries, the shard's loop"

# (row, patterns): the first entry with any pattern in any frame of a sample takes it. A row
# may come twice: what is called inside a frame must be matched before that frame.
ROWS = [
    ("the API (hyper's server side, handlers, ingest)", API),
    ("writev of the request (kernel: TCP send, loopback receive)", None),  # decided in row_of
    ("rest of hyper's connection task (encode, parse, recvfrom)", CONNECTION),
    (SIGNING, ("Target::sign", "payload::build", "verify::Signer")),
    ("hyper-util's request (pool checkout, its boxed future)",
     ("transport::http::", "hyper_util::client")),
    (SIGNING, ("ideal::main",)),  # the loop's own body: formatting it and its headers
    ("transport glue (request and headers assembled, the timeout, outcome)",
     ("herald::transport::{impl#0}::deliver",)),
    ("history: recording", ("herald::history::", "write_history", "take_history")),
    (READING, ("start_due", "next_batch")),  # before the deliveries they start
    ("the delivery's own work (decode, lookup, admission, settle)",
     ("process_supervised", "shard::supervise")),
    (READING, ("shard::run",)),  # after the deliveries it polls
    ("tokio's timers and scheduler, and the rest",
     ("tokio::runtime::time", "tokio::runtime::scheduler")),
]


def row_of(comm, frames):
    if not comm.startswith("tokio-rt-worker"):
        return "thread " + comm
    if any(a in f for f in frames for a in API):
        return ROWS[0][0]
    connection = any(c in f for f in frames for c in CONNECTION)
    if connection and any(w in f for f in frames for w in WRITEV):
        return ROWS[1][0]
    for name, patterns in ROWS[2:]:
        if any(p in f for f in frames for p in patterns):
            return name
    return "other"


def samples(lines):
    """(comm, frames) per sample of `perf script -F comm,ip,sym`."""
    comm, frames = None, []
    for line in lines:
        if line.startswith("\t") or line.startswith(" "):
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                frames.append(parts[1])
        elif line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = line.split()[0], []
    if comm is not None:
        yield comm, frames


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("script", nargs="?", help="perf script output (default: stdin)")
    parser.add_argument("--us", type=float, help="CPU µs per delivery of the whole run (backlog.sh and e2e.sh print it)")
    args = parser.parse_args()
    source = open(args.script) if args.script else sys.stdin
    counts = collections.Counter(row_of(c, f) for c, f in samples(source) if f)
    total = sum(counts.values())
    if not total:
        sys.exit("no samples with call graphs: record with --call-graph dwarf")
    threads = sorted(k for k in counts if k.startswith("thread "))
    order = list(dict.fromkeys(name for name, _ in ROWS)) + threads + ["other"]
    for name in order:
        if counts[name]:
            share = counts[name] / total
            us = f"{share * args.us:6.2f} µs" if args.us else ""
            print(f"{100 * share:6.2f} %  {us}  {name}")
    print(f"{total} samples")


if __name__ == "__main__":
    main()
