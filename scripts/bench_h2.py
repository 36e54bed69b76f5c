#!/usr/bin/env python3
"""`make bench`, HTTP/2 part: the load balancer against HAProxy with HTTP/2
on both sides, same machine, same run, same terms.

Three release backends serve h2c; the proxy under test runs alone on core
0 and speaks h2c to them (the load balancer: `"backendProtocol": "h2c"`,
HAProxy: `proto h2` on the servers), round robin, no access logs. h2load
(Debian's nghttp2-client) runs on core 1 beside the backends: 8 connections,
16 concurrent streams each, for BENCH_SECONDS, GET /. Printed per proxy:
requests/s, the proxy's CPU per request (user + sys / requests), errors;
the median of ROUNDS interleaved runs.

Target: no more CPU per request than HAProxy. Written: target/bench/h2.json.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers)

ROOT = bench.ROOT
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def h2load(port):
    cmd = ["taskset", "-c", bench.LOAD_CPU, "h2load", "-c8", "-m16", "-t1", f"-D{SECONDS}",
           f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    if not done:
        sys.exit(f"bench: could not read h2load's output:\n{out}")
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    return {"succeeded": int(done.group(3)), "failed": int(done.group(4)) + int(done.group(5)), "rps": rps}


def measure(port, process):
    pids = bench.pids_of(process)
    before = bench.cpu_seconds(pids)
    result = h2load(port)
    result["cpu_us_per_request"] = (bench.cpu_seconds(pids) - before) / max(result["succeeded"], 1) * 1e6
    return result


def main():
    bench.ensure_tools([("h2load", "nghttp2-client"), ("haproxy", "haproxy"), ("valgrind", "valgrind")])
    release = bench.build_release()
    tmp = tempfile.mkdtemp(prefix="bench-h2-")
    quiet = {"RUST_LOG": "warn"}

    upstreams = []
    for i in range(3):
        port = bench.free_port()
        config = Path(tmp) / f"backend-{i}.json"
        config.write_text(json.dumps({"port": port, "accessLog": False}))
        process = bench.start([str(release / "backend"), "--host", "127.0.0.1", "--config", str(config)],
                              bench.LOAD_CPU, {**quiet, "POD_NAME": f"bench-{i + 1}"})
        bench.wait_http(f"http://127.0.0.1:{port}/healthz", process)
        upstreams.append(f"127.0.0.1:{port}")

    lb_port, admin_port = bench.free_port(), bench.free_port()
    lb_config = Path(tmp) / "lb.json"
    lb_config.write_text(json.dumps({"port": lb_port, "adminPort": admin_port, "discovery": "static",
                                     "backends": upstreams, "backendProtocol": "h2c", "accessLog": False}))
    lb = bench.start([str(release / "loadbalancer"), "--host", "127.0.0.1", "--config", str(lb_config)],
                     bench.PROXY_CPU, quiet)
    bench.wait_http(f"http://127.0.0.1:{admin_port}/readyz", lb)
    haproxy_port = bench.free_port()
    haproxy = bench.start(["haproxy", "-db", "-f", str(bench.haproxy_config(
        tmp, haproxy_port, upstreams, mode="http", balance="roundrobin", h2=True))],
                          bench.PROXY_CPU)
    h2load(haproxy_port)  # also waits until HAProxy answers

    bench.say(f"==> HTTP/2: h2load -c8 -m16 -D{SECONDS} on core {bench.LOAD_CPU}, proxy on core "
              f"{bench.PROXY_CPU}, h2c to the backends; medians of {ROUNDS} interleaved rounds")
    runs = {"loadbalancer": [], "haproxy": []}
    for _ in range(ROUNDS):
        runs["loadbalancer"].append(measure(lb_port, lb))
        runs["haproxy"].append(measure(haproxy_port, haproxy))
    results = {}
    for name, results_of in runs.items():
        cpu = sorted(r["cpu_us_per_request"] for r in results_of)
        rps = sorted(r["rps"] for r in results_of)
        failed = sum(r["failed"] for r in results_of)
        results[name] = {"cpu_us_per_request": cpu[len(cpu) // 2], "rps": rps[len(rps) // 2],
                         "failed": failed, "runs": results_of}
        bench.say(f"    {name:13} {rps[len(rps) // 2]:8.0f} req/s  CPU {cpu[len(cpu) // 2]:5.1f} µs/req "
                  f"({', '.join(f'{c:.1f}' for c in cpu)})  {failed} failed")
    ratio = results["loadbalancer"]["cpu_us_per_request"] / results["haproxy"]["cpu_us_per_request"]
    bench.say(f"    loadbalancer / haproxy: CPU per request {ratio:.2f}x -> target {'met' if ratio <= 1 else 'NOT met'}")

    bench.say("==> counting user-space instructions per HTTP/2 request with callgrind (h2load -c4 -m16)")
    counted_port, counted_admin, single_port = bench.free_port(), bench.free_port(), bench.free_port()
    counted_config = Path(tmp) / "lb-counted.json"
    counted_config.write_text(json.dumps({**json.loads(lb_config.read_text()),
                                          "port": counted_port, "adminPort": counted_admin}))
    counted = {
        "loadbalancer": bench.instructions_per_request(
            [str(release / "loadbalancer"), "--host", "127.0.0.1", "--config", str(counted_config)],
            f"http://127.0.0.1:{counted_port}/", quiet, load="h2"),
        "haproxy": bench.instructions_per_request(
            ["haproxy", "-db", "-f", str(bench.haproxy_config(
                tmp, single_port, upstreams, mode="http", balance="roundrobin", h2=True))],
            f"http://127.0.0.1:{single_port}/", load="h2"),
    }
    results["instructions_per_request"] = counted
    bench.say(f"    loadbalancer {counted['loadbalancer']:.0f}, haproxy {counted['haproxy']:.0f}, "
              f"{counted['loadbalancer'] / counted['haproxy']:.2f}x")
    bench.write_results("h2.json", results)


if __name__ == "__main__":
    bench.run(main)
