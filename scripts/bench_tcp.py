#!/usr/bin/env python3
"""`make bench`, TCP part: the load balancer's TCP mode against HAProxy
(`mode tcp`) and nginx (`stream`), same machine, same run, same terms.

The proxy under test runs alone on core 0; the backends (release `backend`
binaries with their TCP echo port: a greeting, then every byte echoed) and
this script's clients share core 1. Access logs are off everywhere (the load
balancer: `accessLog: false`, RUST_LOG=warn). All three pick backends by
least connections. Measured, per proxy:

- CPU per GiB: one connection echoes 1 GiB (1 GiB each way through the
  proxy); the proxy's CPU time (user + sys) / GiB.
- CPU per short connection: connect, read the greeting, close, back to back
  from 8 client threads for BENCH_SECONDS; the proxy's CPU time / connections.

Both are taken ROUNDS times, the proxies taking turns, and the median is
reported: single runs of either vary by 10 to 30% on a shared machine.
- Memory with 1,000 idle connections: each opened and greeted, then held
  open while the proxy's resident memory (VmRSS) is read.

Target: no more CPU per GiB and per connection than nginx `stream`.
Results are printed and written to target/bench/tcp.json.
"""

import json
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers)

ROOT = bench.ROOT
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
GIB = 1 << 30
IDLE = 1000


def wait_tcp(port, process):
    deadline = time.time() + 15
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench: {process.args} exited: {process.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"hello from"):
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: 127.0.0.1:{port} did not greet within 15 s")


def greet(port):
    s = socket.create_connection(("127.0.0.1", port))
    line = b""
    while not line.endswith(b"\n"):
        data = s.recv(64)
        if not data:
            raise OSError("closed before the greeting")
        line += data
    return s


def stream_gib(port):
    """Echoes 1 GiB through one connection; returns the bytes received back."""
    s = greet(port)
    chunk = b"\0" * (1 << 20)
    received = [0]

    def receive():
        while data := s.recv(1 << 20):
            received[0] += len(data)

    reader = threading.Thread(target=receive)
    reader.start()
    for _ in range(GIB // len(chunk)):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reader.join()
    s.close()
    return received[0]


def short_connections(port):
    count, errors, lock = [0], [0], threading.Lock()
    end = time.monotonic() + SECONDS

    def client():
        mine, failed = 0, 0
        while time.monotonic() < end:
            try:
                greet(port).close()
                mine += 1
            except OSError:
                failed += 1
        with lock:
            count[0] += mine
            errors[0] += failed

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count[0], errors[0]


def cpu_per_gib(port, process):
    pids = bench.pids_of(process)
    before = bench.cpu_seconds(pids)
    echoed = stream_gib(port)
    if echoed != GIB:
        sys.exit(f"bench: {process.args} echoed {echoed} bytes of {GIB}")
    return bench.cpu_seconds(pids) - before


def cpu_per_connection(port, process):
    pids = bench.pids_of(process)
    before = bench.cpu_seconds(pids)
    connections, errors = short_connections(port)
    return (bench.cpu_seconds(pids) - before) / connections * 1e6, connections / SECONDS, errors


def memory(port, process):
    pids = bench.pids_of(process)
    base = bench.status_mib(pids, "VmRSS")
    idle = [greet(port) for _ in range(IDLE)]
    held = bench.status_mib(pids, "VmRSS")
    for s in idle:
        s.close()
    return base, held


def median(values):
    return sorted(values)[len(values) // 2]


def measure_all(proxies):
    """The proxies take turns, ROUNDS times; medians per proxy."""
    gib = {name: [] for name in proxies}
    conn = {name: [] for name in proxies}
    for _ in range(ROUNDS):
        for name, (port, process) in proxies.items():
            gib[name].append(cpu_per_gib(port, process))
            conn[name].append(cpu_per_connection(port, process))
    results = {}
    for name, (port, process) in proxies.items():
        base, held = memory(port, process)
        per_conn = median([c[0] for c in conn[name]])
        results[name] = {
            "cpu_s_per_gib": median(gib[name]),
            "cpu_s_per_gib_runs": gib[name],
            "cpu_us_per_connection": per_conn,
            "cpu_us_per_connection_runs": [c[0] for c in conn[name]],
            "connections_per_s": median([c[1] for c in conn[name]]),
            "errors": sum(c[2] for c in conn[name]),
            "rss_mib_idle_before": base,
            "rss_mib_with_1000_idle": held,
        }
        r = results[name]
        runs = ", ".join(f"{g:.2f}" for g in gib[name])
        bench.say(f"    {name:13} {r['cpu_s_per_gib']:6.3f} CPU s/GiB ({runs})  {r['connections_per_s']:6.0f} conn/s  "
                  f"{per_conn:6.1f} CPU µs/conn  {r['errors']} errors  RSS {base:.1f} -> {held:.1f} MiB "
                  f"with {IDLE} idle")
    return results


def nginx_config(tmp, port, upstreams):
    servers = "\n".join(f"    server {u};" for u in upstreams)
    conf = Path(tmp) / "nginx-stream.conf"
    conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
stream {{
  upstream backends {{
    least_conn;
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    proxy_pass backends;
    # Pass a client's shutdown of its sending side on, as the others do.
    proxy_half_close on;
  }}
}}
""")
    return conf


def main():
    bench.ensure_tools([("haproxy", "haproxy"),
                        ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream")])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    # The clients run in this process: on the load core, never beside the proxy.
    os.sched_setaffinity(0, {int(bench.LOAD_CPU)})
    release = bench.build_release()
    tmp = tempfile.mkdtemp(prefix="bench-tcp-")
    quiet = {"RUST_LOG": "warn"}

    upstreams = []
    for i in range(3):
        config = Path(tmp) / f"backend-{i}.json"
        tcp_port = bench.free_port()
        config.write_text(json.dumps({"port": 0, "tcpPort": tcp_port, "accessLog": False}))
        process = bench.start([str(release / "backend"), "--host", "127.0.0.1", "--config", str(config)],
                              bench.LOAD_CPU, {**quiet, "POD_NAME": f"bench-{i + 1}"})
        wait_tcp(tcp_port, process)
        upstreams.append(f"127.0.0.1:{tcp_port}")

    lb_port, admin_port = bench.free_port(), bench.free_port()
    lb_config = Path(tmp) / "lb.json"
    lb_config.write_text(json.dumps({"port": lb_port, "adminPort": admin_port, "mode": "tcp",
                                     "discovery": "static", "backends": upstreams, "accessLog": False}))
    lb = bench.start([str(release / "loadbalancer"), "--host", "127.0.0.1", "--config", str(lb_config)],
                     bench.PROXY_CPU, quiet)
    wait_tcp(lb_port, lb)
    nginx_port = bench.free_port()
    nginx = bench.start(["nginx", "-p", tmp, "-c", str(nginx_config(tmp, nginx_port, upstreams))],
                        bench.PROXY_CPU)
    wait_tcp(nginx_port, nginx)
    haproxy_port = bench.free_port()
    haproxy = bench.start(["haproxy", "-db", "-f", str(bench.haproxy_config(
        tmp, haproxy_port, upstreams, mode="tcp", balance="leastconn"))],
                          bench.PROXY_CPU)
    wait_tcp(haproxy_port, haproxy)

    bench.say(f"==> TCP mode: proxy on core {bench.PROXY_CPU}, backends and clients on core {bench.LOAD_CPU}; "
              f"medians of {ROUNDS} rounds")
    results = measure_all({
        "loadbalancer": (lb_port, lb),
        "nginx stream": (nginx_port, nginx),
        "haproxy": (haproxy_port, haproxy),
    })
    ours, nginx_r = results["loadbalancer"], results["nginx stream"]
    gib = ours["cpu_s_per_gib"] / nginx_r["cpu_s_per_gib"]
    conn = ours["cpu_us_per_connection"] / nginx_r["cpu_us_per_connection"]
    met = gib <= 1.0 and conn <= 1.0
    bench.say(f"    loadbalancer / nginx stream: CPU per GiB {gib:.2f}x, CPU per connection {conn:.2f}x "
              f"-> target {'met' if met else 'NOT met'}")
    bench.write_results("tcp.json", results)


if __name__ == "__main__":
    bench.run(main)
