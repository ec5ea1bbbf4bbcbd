#!/usr/bin/env python3
"""How long a page of `GET /v1/subscriptions` takes with N subscriptions stored.

    load-tests/scenarios/list.py [N]                  (default 100000)
    E2E_BIN_DIR=/other/build load-tests/scenarios/list.py 100000

Starts a release Herald on a fresh embedded log (port 18555), creates N subscriptions over 100
tenants from 8 connections (1 in 100 disabled), then reads 40 pages one after another — all
tenants' 500 and 50 at a time, one tenant's 100 at a time — and one page of the disabled ones,
and prints the median and 90th percentile. Loopback only; the server is stopped at the end.
"""
import http.client, json, os, shutil, subprocess, sys, tempfile, time, threading, statistics
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
binp = os.path.join(os.environ.get("E2E_BIN_DIR", os.path.join(root, "target", "release")), "herald")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
tok = "bench-admin-token-0123456789"
d = tempfile.mkdtemp()
env = dict(os.environ, HERALD_ADMIN_TOKEN=tok, RUST_LOG="warn")
p = subprocess.Popen([binp, "serve", "--listen", "127.0.0.1:18555", "--data-dir", d], env=env,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def conn():
    for _ in range(100):
        try:
            c = http.client.HTTPConnection("127.0.0.1", 18555, timeout=30); c.request("GET", "/healthz"); c.getresponse().read(); return c
        except Exception: time.sleep(0.1)
    raise SystemExit("no server")
H = {"authorization": "Bearer " + tok, "content-type": "application/json"}
def create(lo, hi):
    c = conn()
    for i in range(lo, hi):
        body = {"url": f"https://hooks{i % 50}.example.com/h/{i}", "tenant": f"t{i % 100}", "enabled": i % 100 != 7}
        c.request("POST", "/v1/subscriptions", json.dumps(body), H); r = c.getresponse(); r.read()
        assert r.status == 201, r.status
t0 = time.time()
ths = [threading.Thread(target=create, args=(k * n // 8, (k + 1) * n // 8)) for k in range(8)]
[t.start() for t in ths]; [t.join() for t in ths]
print(f"created {n} in {time.time() - t0:.1f} s")
c = conn()
def page(q):
    t = time.perf_counter(); c.request("GET", "/v1/subscriptions?" + q, headers=H); r = c.getresponse(); b = r.read()
    assert r.status in (200, 400), (r.status, b[:200]); return (time.perf_counter() - t) * 1000, json.loads(b)
for label, q in [("all tenants, limit=500", "limit=500"), ("one tenant, limit=100", "tenant=t5&limit=100"),
                 ("all tenants, limit=50", "limit=50")]:
    ms = []
    cursor = None
    for _ in range(40):
        took, b = page(q + (f"&cursor={cursor}" if cursor else ""))
        ms.append(took); cursor = b.get("next")
    ms.sort()
    print(f"{label}: median {statistics.median(ms):.2f} ms, p90 {ms[int(len(ms) * 0.9)]:.2f} ms over 40 pages")
took, b = page("limit=500&enabled=false")
print(f"enabled=false, limit=500: {took:.2f} ms, {len(b.get('items', [])) if 'items' in b else b}")
p.terminate(); p.wait()
shutil.rmtree(d, ignore_errors=True)
