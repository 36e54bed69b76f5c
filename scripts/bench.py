#!/usr/bin/env python3
"""`make bench`: the load balancer against direct and nginx, on identical terms.

Three release `backend` upstreams and the load generator (wrk) share core 1;
the proxy under test runs alone on core 0. On two cores the load side
saturates first, so requests per second mostly measure the load side; the
figure that compares proxies is the CPU time the proxy spent per request
(user + sys of its processes / requests). nginx runs one worker with upstream
keep-alive and no access log; the load balancer runs with RUST_LOG=warn (no
per-request log line), so neither writes logs in the hot path.

Also measured: the load balancer again with its default per-request access
log on (info level, to /dev/null through the non-blocking writer), for what
a log line costs; and its peak RSS after streaming a 1 GiB upload
through it.

Environment: BENCH_SECONDS (default 10), BENCH_CONNECTIONS (default 32),
BENCH_ONLY=loadbalancer to measure only the load balancer (while tuning),
BENCH_ONLY=instructions to count only its instructions per request (while
refactoring: the figure to hold steady).
Results are printed and written to target/bench/results.json.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
PROXY_CPU, LOAD_CPU = "0", "1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_PATH = "/"

processes = []


def say(message):
    print(message, flush=True)


def ensure_tools(extra=()):
    """Installs what is missing; `extra` adds (file or tool, package) pairs."""
    wanted = [("wrk", "wrk"), ("nginx", "nginx-light"), ("taskset", "util-linux"), *extra]
    missing = [pkg for tool, pkg in wanted
               if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: missing {' '.join(missing)}; install with: sudo apt-get install {' '.join(missing)}")
    say(f"==> apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, cpu, env=None):
    process = subprocess.Popen(["taskset", "-c", cpu, *cmd], env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes.append(process)
    return process


def wait_http(url, process, h2=False):
    """Waits until `url` answers; with `h2`, over HTTP/2 with prior knowledge
    (HAProxy's h2 port answers nothing else)."""
    def answers():
        if h2:
            done = subprocess.run(["h2load", "-n1", "-c1", url], capture_output=True, text=True,
                                  timeout=5).stdout
            return "1 succeeded" in done
        with urllib.request.urlopen(url, timeout=1):
            return True

    deadline = time.time() + 15
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench: {process.args} exited: {process.stderr.read().decode()}")
        try:
            if answers():
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.05)
    sys.exit(f"bench: {url} did not answer{' HTTP/2' if h2 else ''} within 15 s")


def pids_of(process):
    """The process and its children (nginx's worker)."""
    pids = [process.pid]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return pids


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def status_mib(pids, field):
    """The sum of a memory `field` of /proc/PID/status (VmRSS, VmHWM), in MiB."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1])
    return total / 1024


def peak_rss_mib(pids):
    return status_mib(pids, "VmHWM")


def build_release():
    """Builds both binaries in release mode; returns where they are."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "backend", "-p", "loadbalancer"],
                   cwd=ROOT, check=True)
    return ROOT / "target" / "release"


def to_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def wrk(url, close):
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", url]
    if close:
        cmd[5:5] = ["-H", "Connection: close"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    if not re.search(r"99%\s+[\d.]+(us|ms|s|m)\b", out):
        sys.exit(f"bench: could not read wrk's output:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": to_ms(re.search(r"50%\s+(\S+)", out).group(1)),
        "p99_ms": to_ms(re.search(r"99%\s+(\S+)", out).group(1)),
        "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0),
    }


def measure(name, url, proxy):
    results = {}
    for mode, close in [("keep-alive", False), ("new connection per request", True)]:
        pids = pids_of(proxy) if proxy else []
        before = cpu_seconds(pids) if proxy else 0
        result = wrk(url, close)
        if proxy:
            result["cpu_us_per_request"] = (cpu_seconds(pids) - before) / result["requests"] * 1e6
            result["peak_rss_mib"] = peak_rss_mib(pids)
        results[mode] = result
        cpu = f"  CPU {result['cpu_us_per_request']:.1f} µs/req" if proxy else ""
        say(f"    {name:13} {mode:27} {result['rps']:9.0f} req/s  p99 {result['p99_ms']:.2f} ms{cpu}")
    return results


def nginx_config(tmp, port, upstreams, master=True):
    """nginx as a round-robin reverse proxy; without `master`, the worker is
    the only process (as callgrind needs)."""
    servers = "\n".join(f"    server {u};" for u in upstreams)
    conf = Path(tmp) / ("nginx.conf" if master else "nginx-single.conf")
    conf.write_text(f"""
worker_processes 1;
{"" if master else "master_process off;"}
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream backends {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
""")
    return conf


def haproxy_config(tmp, port, upstreams, mode, balance, h2=False):
    """HAProxy with one thread and no logging, over `upstreams`: `mode` tcp
    or http; with `h2`, HTTP/2 on both sides (prior knowledge)."""
    proto = " proto h2" if h2 else ""
    servers = "\n".join(f"  server s{i} {u}{proto}" for i, u in enumerate(upstreams))
    conf = Path(tmp) / f"haproxy-{mode}.cfg"
    conf.write_text(f"""
global
  maxconn 4096
  nbthread 1
defaults
  mode {mode}
  timeout connect 5s
  timeout client 600s
  timeout server 600s
frontend incoming
  bind 127.0.0.1:{port}{proto}
  default_backend backends
backend backends
  balance {balance}
{servers}
""")
    return conf


def instructions_per_request(command, url, env=None, load="keep-alive"):
    """User-space instructions per request, counted by callgrind: repeatable
    where CPU times vary by 10% from run to run. The difference between a
    short run and a long one, so startup cancels out. `load`: "keep-alive"
    (h2load --h1, 1,000 and 11,000 requests), "new connection" (wrk with
    `Connection: close` for 2 s and 6 s) or "h2" (h2load, 16 streams per
    connection)."""
    totals, requests = [], []
    for short_or_long in (0, 1):
        out = Path(tempfile.mkdtemp(prefix="bench-callgrind-")) / "out"
        process = start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                        PROXY_CPU, env)
        wait_http(url, process, h2=load == "h2")
        if load == "new connection":
            seconds = (2, 6)[short_or_long]
            done = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c4", f"-d{seconds}s",
                                   "-H", "Connection: close", url],
                                  check=True, capture_output=True, text=True).stdout
            requests.append(int(re.search(r"(\d+) requests in", done).group(1)))
        else:
            n = (1000, 11000)[short_or_long]
            streams = ["-m", "16"] if load == "h2" else ["--h1"]
            subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", *streams, "-n", str(n), "-c", "4", url],
                           check=True, capture_output=True)
            requests.append(n)
        process.terminate()
        process.wait(timeout=120)
        totals.append(int(re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M).group(1)))
    return (totals[1] - totals[0]) / (requests[1] - requests[0])


def upload_gib(url, proxy):
    """Streams 1 GiB through /echo and returns the proxy's peak RSS after."""
    chunk = b"\0" * (1 << 20)
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {1 << 30}\r\n"
                  "Connection: close\r\n\r\n".encode())
        s.setblocking(False)
        received = 0
        for _ in range(1024):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[s.send(view):]
                except BlockingIOError:
                    pass
                try:
                    received += len(s.recv(1 << 20))
                except BlockingIOError:
                    pass
        s.setblocking(True)
        while data := s.recv(1 << 20):
            received += len(data)
    return peak_rss_mib(pids_of(proxy)), received


def main():
    ensure_tools([("valgrind", "valgrind"), ("h2load", "nghttp2-client")])
    say("==> cargo build --release -p backend -p loadbalancer")
    release = build_release()
    quiet = {"RUST_LOG": "warn"}

    upstreams = []
    for i in range(3):
        port = free_port()
        process = start([str(release / "backend"), "--host", "127.0.0.1", "--port", str(port),
                         "--config", str(ROOT / "backend" / "config.json")], LOAD_CPU,
                        {**quiet, "POD_NAME": f"bench-{i + 1}", "POD_IP": "127.0.0.1"})
        wait_http(f"http://127.0.0.1:{port}/healthz", process)
        upstreams.append(f"127.0.0.1:{port}")

    if os.environ.get("BENCH_ONLY") == "instructions":
        return count_only_loadbalancer(release, upstreams, quiet)
    lb_port, admin_port, nginx_port = free_port(), free_port(), free_port()
    lb = start([str(release / "loadbalancer"), "--host", "127.0.0.1", "--port", str(lb_port),
                "--admin-port", str(admin_port), "--backends", ",".join(upstreams)], PROXY_CPU, quiet)
    wait_http(f"http://127.0.0.1:{admin_port}/readyz", lb)
    # The same, with the default per-request access log on (to /dev/null
    # through the non-blocking writer), for what the log line costs.
    logged_port, logged_admin = free_port(), free_port()
    logged = start([str(release / "loadbalancer"), "--host", "127.0.0.1", "--port", str(logged_port),
                    "--admin-port", str(logged_admin), "--backends", ",".join(upstreams)], PROXY_CPU,
                   {"RUST_LOG": "info"})
    wait_http(f"http://127.0.0.1:{logged_admin}/readyz", logged)
    tmp = tempfile.mkdtemp(prefix="bench-nginx-")
    nginx = start(["nginx", "-p", tmp, "-c", str(nginx_config(tmp, nginx_port, upstreams))], PROXY_CPU)
    wait_http(f"http://127.0.0.1:{nginx_port}/", nginx)

    say(f"==> wrk -t1 -c{CONNECTIONS} -d{SECONDS}s, proxy on core {PROXY_CPU}, load and upstreams on core {LOAD_CPU}")
    if os.environ.get("BENCH_ONLY") == "loadbalancer":
        measure("loadbalancer", f"http://127.0.0.1:{lb_port}{PAGE_PATH}", lb)
        return
    results = {
        "direct": measure("direct", f"http://{upstreams[0]}{PAGE_PATH}", None),
        "loadbalancer": measure("loadbalancer", f"http://127.0.0.1:{lb_port}{PAGE_PATH}", lb),
        "nginx": measure("nginx", f"http://127.0.0.1:{nginx_port}{PAGE_PATH}", nginx),
        "loadbalancer, access log": measure("lb, logging", f"http://127.0.0.1:{logged_port}{PAGE_PATH}", logged),
    }
    say("==> counting user-space instructions per request with callgrind")
    counted_port, counted_admin, single_port = free_port(), free_port(), free_port()
    counted_lb = [str(release / "loadbalancer"), "--host", "127.0.0.1", "--port", str(counted_port),
                  "--admin-port", str(counted_admin), "--backends", ",".join(upstreams)]
    single_nginx = ["nginx", "-p", tmp, "-c", str(nginx_config(tmp, single_port, upstreams, master=False))]
    results["instructions_per_request"] = {
        mode: {
            "loadbalancer": instructions_per_request(counted_lb, f"http://127.0.0.1:{counted_port}/", quiet, load),
            "nginx": instructions_per_request(single_nginx, f"http://127.0.0.1:{single_port}/", load=load),
        }
        for mode, load in [("keep-alive", "keep-alive"), ("new connection per request", "new connection")]
    }
    say("==> streaming a 1 GiB upload through the load balancer")
    rss, echoed = upload_gib(f"http://127.0.0.1:{lb_port}/", lb)
    results["upload_1gib"] = {"echoed_bytes": echoed, "peak_rss_mib": rss}

    report(results)
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    say(f"\nwritten to {out / 'results.json'}")


def count_only_loadbalancer(release, upstreams, env):
    """BENCH_ONLY=instructions: the callgrind figures of the load balancer alone."""
    port, admin = free_port(), free_port()
    command = [str(release / "loadbalancer"), "--host", "127.0.0.1", "--port", str(port),
               "--admin-port", str(admin), "--backends", ",".join(upstreams)]
    for mode, load in [("keep-alive", "keep-alive"), ("new connection per request", "new connection")]:
        counted = instructions_per_request(command, f"http://127.0.0.1:{port}/", env, load)
        say(f"user-space instructions per request, {mode} (callgrind): loadbalancer {counted:.0f}")


def report(results):
    for mode in ["keep-alive", "new connection per request"]:
        say(f"\n{mode} ({CONNECTIONS} connections, {SECONDS} s)")
        say(f"  {'':13} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} {'peak RSS MiB':>13} {'errors':>7}")
        for name in ["direct", "loadbalancer", "nginx"]:
            r = results[name][mode]
            cpu = f"{r['cpu_us_per_request']:11.1f}" if "cpu_us_per_request" in r else f"{'-':>11}"
            rss = f"{r['peak_rss_mib']:13.1f}" if "peak_rss_mib" in r else f"{'-':>13}"
            say(f"  {name:13} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {cpu} {rss} {r['errors']:7d}")
        lb, nginx = results["loadbalancer"][mode], results["nginx"][mode]
        say(f"  loadbalancer / nginx: req/s {lb['rps'] / nginx['rps']:.2f}x, "
            f"p99 {lb['p99_ms'] / nginx['p99_ms']:.2f}x, "
            f"CPU per request {lb['cpu_us_per_request'] / nginx['cpu_us_per_request']:.2f}x")
    for mode in ["keep-alive", "new connection per request"]:
        quiet, logged = results["loadbalancer"][mode], results["loadbalancer, access log"][mode]
        extra = logged["cpu_us_per_request"] / quiet["cpu_us_per_request"] - 1
        say(f"access log on, {mode}: CPU per request {logged['cpu_us_per_request']:.1f} µs, "
            f"{100 * extra:+.0f}% over off (target: under +10%), {logged['errors']} errors")
    say("")
    for mode, counted in results["instructions_per_request"].items():
        say(f"user-space instructions per request, {mode} (callgrind): loadbalancer "
            f"{counted['loadbalancer']:.0f}, nginx {counted['nginx']:.0f}, "
            f"{counted['loadbalancer'] / counted['nginx']:.2f}x")
    upload = results["upload_1gib"]
    say(f"\n1 GiB upload through the load balancer: {upload['echoed_bytes']} bytes received back, "
        f"peak RSS {upload['peak_rss_mib']:.1f} MiB")


def run(main_function):
    """Runs a bench's main, then stops every process it started, by PID."""
    try:
        main_function()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def write_results(name, results):
    """Writes `results` to target/bench/NAME and says where."""
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(results, indent=2))
    say(f"written to {out / name}")


if __name__ == "__main__":
    run(main)
