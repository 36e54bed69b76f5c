#!/usr/bin/env bash
# The local demo, no cluster needed: three backends and the load balancer on
# loopback, N requests through it, the distribution printed. Everything it
# starts is stopped when it ends, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${N:-300}
lb_port=${LB_PORT:-8080}
admin_port=${ADMIN_PORT:-8081}
first_backend_port=${BACKEND_PORT:-9001}
command -v curl >/dev/null || { echo "demo: curl is needed; install it (apt-get install curl)" >&2; exit 1; }

echo "==> cargo build -p backend -p loadbalancer"
cargo build --quiet -p backend -p loadbalancer

logs=$(mktemp -d)
pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop_all EXIT
trap 'echo; echo "demo: interrupted"; exit 130' INT TERM

# Waits (at most 10 s) until URL answers 200; shows the log if PID died.
wait_ready() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 100); do
    curl -sf -o /dev/null "$url" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: a process exited early; its output ($log):" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "demo: $url did not become ready within 10 s; see $log" >&2
  exit 1
}

backends=()
for i in 1 2 3; do
  port=$((first_backend_port + i - 1))
  echo "==> POD_NAME=backend-$i target/debug/backend --host 127.0.0.1 --port $port"
  POD_NAME=backend-$i POD_IP=127.0.0.1 POD_NAMESPACE=demo \
    target/debug/backend --host 127.0.0.1 --port "$port" --config backend/config.json \
    >"$logs/backend-$i.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz" $! "$logs/backend-$i.log"
  backends+=("127.0.0.1:$port")
done

list=$(IFS=,; echo "${backends[*]}")
echo "==> target/debug/loadbalancer --host 127.0.0.1 --port $lb_port --admin-port $admin_port --backends $list"
target/debug/loadbalancer --host 127.0.0.1 --port "$lb_port" --admin-port "$admin_port" --backends "$list" \
  >"$logs/loadbalancer.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$admin_port/readyz" $! "$logs/loadbalancer.log"

echo
echo "One request, with the headers (note x-served-by):"
curl -si "http://127.0.0.1:$lb_port/" | grep -iE '^(HTTP|x-served-by)|podName' | sed 's/^/  /'
echo
scripts/distribution.sh "http://127.0.0.1:$lb_port/" "$n"
echo "Logs: $logs"
