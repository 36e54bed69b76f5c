#!/usr/bin/env python3
"""`make bench`, second part: the balancing algorithms against a slow backend,
and the cost of the shared round-robin counter in Redis.

Three release backends, one of them answering every `GET /` 50 ms late
(`--response-delay-ms 50`); for each algorithm, the load balancer over them
and 16 client threads sending requests back to back for 5 s, each request
timed by the client itself. Printed per algorithm: requests/s, p50, p99
and the slow backend's share of the requests (from the load balancer's own
`loadbalancer_requests_total`).

Why not wrk here: with one backend 50 ms slow, wrk reported a p50 of 17.7 ms
for round robin, where two thirds of the requests take under a millisecond,
and a p99 of about 50 ms for least connections with 0.3% of the requests
slow. Its percentiles for this mix are not what each request took, so this
run times each request itself. Written: target/bench/algorithms.json and
target/bench/algorithms.svg (a bar chart; `make bench-figures` copies it to
docs/algorithms.svg, which docs/benchmarks.md shows).

Then, with three equal backends and a real `redis-server`: round robin with
the local counter against round robin with `sharedCounter`, to measure what
one Redis INCR per request adds.

Targets: least_connections and power_of_two p99 at most a third of
round_robin's, and the slow backend's share under 10%.
"""

import json
import os
import re
import threading
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: start, wait_http, wrk, free_port)

ROOT = bench.ROOT
ALGORITHMS = ["round_robin", "least_connections", "power_of_two", "random"]
CLIENTS, SECONDS = 16, 5


def wrk(url):
    cmd = ["taskset", "-c", bench.LOAD_CPU, "wrk", "-t1", f"-c{CLIENTS}", f"-d{SECONDS}s", "--latency", url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": bench.to_ms(re.search(r"50%\s+(\S+)", out).group(1)),
        "p99_ms": bench.to_ms(re.search(r"99%\s+(\S+)", out).group(1)),
    }


def clients(port, count=CLIENTS):
    """`count` threads, each with its own keep-alive connection, sending GET /
    back to back for SECONDS; every request timed."""
    latencies, lock = [], threading.Lock()

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port)
        mine, end = [], time.monotonic() + SECONDS
        while time.monotonic() < end:
            start = time.perf_counter()
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                sys.exit(f"bench: status {response.status}")
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    n = len(latencies)
    return {"rps": n / SECONDS, "p50_ms": latencies[n // 2], "p99_ms": latencies[int(n * 0.99)]}


def load_balancer(release, tmp, backends, extra):
    port, admin = bench.free_port(), bench.free_port()
    config = {"port": port, "adminPort": admin, "discovery": "static", "backends": backends, **extra}
    path = Path(tmp) / f"lb-{port}.json"
    path.write_text(json.dumps(config))
    process = bench.start([str(release / "loadbalancer"), "--host", "127.0.0.1", "--config", str(path)],
                          bench.PROXY_CPU, {"RUST_LOG": "warn"})
    bench.wait_http(f"http://127.0.0.1:{admin}/readyz", process)
    return process, port, admin


def served_by(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    counts = {}
    for backend, n in re.findall(r'loadbalancer_requests_total\{backend="([^"]+)",code="200"\} (\d+)', text):
        counts[backend] = counts.get(backend, 0) + int(n)
    return counts


def svg(results, path):
    """Two bar groups: p99 per algorithm, and the slow backend's share."""
    width, bar, gap, left = 640, 28, 18, 150
    top = max(r["p99_ms"] for r in results.values()) or 1
    rows = []
    y = 40
    rows.append(f'<text x="10" y="24" font-size="15" font-weight="bold">p99 latency, ms ({CLIENTS} clients, one backend 50 ms slow)</text>')
    for name, r in results.items():
        w = (width - left - 90) * r["p99_ms"] / top
        rows.append(f'<text x="10" y="{y + 19}" font-size="13">{name}</text>')
        rows.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="#2b7de9"/>')
        rows.append(f'<text x="{left + w + 6:.1f}" y="{y + 19}" font-size="13">{r["p99_ms"]:.1f}</text>')
        y += bar + gap
    y += 20
    rows.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">share of requests to the slow backend</text>')
    y += 16
    for name, r in results.items():
        w = (width - left - 80) * r["slow_share"]
        rows.append(f'<text x="10" y="{y + 19}" font-size="13">{name}</text>')
        rows.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="#d9822b"/>')
        rows.append(f'<text x="{left + w + 6:.1f}" y="{y + 19}" font-size="13">{100 * r["slow_share"]:.1f}%</text>')
        y += bar + gap
    body = "\n  ".join(rows)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
                    f'font-family="sans-serif">\n  <rect width="100%" height="100%" fill="white"/>\n  {body}\n</svg>\n')


def main():
    bench.ensure_tools()
    # The clients below run in this process: on the load core, like wrk,
    # never beside the load balancer.
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    if not shutil.which("redis-server"):
        sys.exit("bench: redis-server is needed (apt-get install redis-server)")
    release = bench.build_release()
    tmp = tempfile.mkdtemp(prefix="bench-algorithms-")

    backends = []
    for i, delay in enumerate([0, 0, 50]):
        port = bench.free_port()
        process = bench.start([str(release / "backend"), "--host", "127.0.0.1", "--port", str(port),
                               "--config", str(ROOT / "backend" / "config.json"),
                               "--response-delay-ms", str(delay)],
                              bench.LOAD_CPU, {"RUST_LOG": "warn", "POD_NAME": f"bench-{i + 1}"})
        bench.wait_http(f"http://127.0.0.1:{port}/healthz", process)
        backends.append(f"127.0.0.1:{port}")
    slow = backends[2]

    bench.say(f"==> algorithms: {CLIENTS} clients for {SECONDS} s on core {bench.LOAD_CPU}, backend {slow} answers 50 ms late")
    def run(algorithm, count, label):
        """One load balancer with `algorithm`, `count` clients; its figures."""
        lb, port, admin = load_balancer(release, tmp, backends, {"algorithm": algorithm})
        result = clients(port, count)
        counts = served_by(admin)
        result["slow_share"] = counts.get(slow, 0) / max(sum(counts.values()), 1)
        lb.terminate()
        lb.wait()
        bench.say(f"    {label:18} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                  f"p99 {result['p99_ms']:6.2f} ms  slow backend {100 * result['slow_share']:5.1f}%")
        return result

    results = {algorithm: run(algorithm, CLIENTS, algorithm) for algorithm in ALGORITHMS}
    rr = results["round_robin"]["p99_ms"]
    for algorithm in ["least_connections", "power_of_two"]:
        r = results[algorithm]
        met = r["p99_ms"] <= rr / 3 and r["slow_share"] < 0.10
        bench.say(f"    {algorithm}: p99 {r['p99_ms'] / rr:.2f}x round robin's, slow share "
                  f"{100 * r['slow_share']:.1f}% -> target {'met' if met else 'NOT met'}")

    # Least connections evens out the number of requests open, so the slow
    # backend's share, and with it the p99, follows the number of clients.
    bench.say("==> least_connections by number of clients")
    sweep = {count: run("least_connections", count, f"{count} clients") for count in [2, 4, 16, 64]}

    redis_port = bench.free_port()
    bench.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], bench.LOAD_CPU)
    time.sleep(0.3)
    fast = backends[:2]
    bench.say(f"==> shared counter: round robin over {len(fast)} equal backends, local counter vs Redis INCR")
    counter = {}
    for name, extra in [("local", {}), ("redis", {"sharedCounter": f"redis://127.0.0.1:{redis_port}"})]:
        lb, port, admin = load_balancer(release, tmp, fast, extra)
        time.sleep(1.5)  # the Redis connection is made in the background
        counter[name] = wrk(f"http://127.0.0.1:{port}/")
        lb.terminate()
        lb.wait()
        c = counter[name]
        bench.say(f"    {name:6} {c['rps']:8.0f} req/s  p50 {c['p50_ms']:6.3f} ms  p99 {c['p99_ms']:6.3f} ms")
    added = counter["redis"]["p50_ms"] - counter["local"]["p50_ms"]
    bench.say(f"    Redis adds {1000 * added:.0f} µs at p50 per request")

    bench.write_results("algorithms.json",
                        {"algorithms": results, "least_connections_by_clients": sweep, "counter": counter})
    chart = ROOT / "target" / "bench" / "algorithms.svg"
    svg(results, chart)
    bench.say(f"and {chart} (make bench-figures copies it into docs/)")


if __name__ == "__main__":
    bench.run(main)
