#!/usr/bin/env python3
# Does a log checkpoint's burst of segment writeback stall the journal's fdatasync?
#   python3 load-tests/scenarios/writeback.py burst|spread SECONDS DIR   (DIR on the disk to test)
# J: 2 KiB write + fdatasync every ~1 ms (the writer's group commits), latency recorded.
# S: 12.5 MB/s buffered appends to a segment file; every 32 MiB a checkpoint fdatasyncs it.
# mode "burst": nothing until the checkpoint; "spread": sync_file_range(WRITE) per 1 MiB written.
import os, sys, time, threading, ctypes
mode, secs, d = sys.argv[1], float(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
WRITE = 2
jf = os.open(os.path.join(d, "j"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
os.ftruncate(jf, 32 << 20); os.fsync(jf)
lat = []; stop = time.time() + secs
def journal():
    pos = 0; buf = b"j" * 2048
    while time.time() < stop:
        t = time.perf_counter()
        os.pwrite(jf, buf, pos); os.fdatasync(jf)
        lat.append(time.perf_counter() - t)
        pos = (pos + 2048) % (32 << 20)
        time.sleep(0.0008)
ckpt = []
def segments():
    n = 0; chunk = b"s" * (64 << 10); seg = 0
    sf = os.open(os.path.join(d, "s%d" % seg), os.O_RDWR | os.O_CREAT | os.O_TRUNC); written = 0; last = 0
    t0 = time.time()
    while time.time() < stop:
        os.write(sf, chunk); written += len(chunk); n += len(chunk)
        if mode == "spread" and written - last >= (1 << 20):
            libc.sync_file_range(sf, last, written - last, WRITE); last = written
        if written >= (32 << 20):
            t = time.perf_counter(); os.fdatasync(sf); ckpt.append(time.perf_counter() - t)
            os.close(sf); seg += 1
            sf = os.open(os.path.join(d, "s%d" % seg), os.O_RDWR | os.O_CREAT | os.O_TRUNC); written = 0; last = 0
        # pace to 12.5 MB/s
        ahead = n / 12.5e6 - (time.time() - t0)
        if ahead > 0: time.sleep(ahead)
a = threading.Thread(target=journal); b = threading.Thread(target=segments)
a.start(); b.start(); a.join(); b.join()
lat.sort(); q = lambda p: lat[int(p * (len(lat) - 1))] * 1000
print(f"{mode}: n={len(lat)} p50={q(.5):.2f} p90={q(.9):.2f} p99={q(.99):.2f} p999={q(.999):.2f} max={lat[-1]*1000:.1f} ms; checkpoints {len(ckpt)} at {', '.join('%.0f' % (c*1000) for c in ckpt[:8])} ms")
for f in os.listdir(d):
    if f == "j" or f.startswith("s"):
        os.unlink(os.path.join(d, f))
