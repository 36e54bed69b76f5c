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

name=demo
source scripts/processes.sh

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
