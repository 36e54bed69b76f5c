#!/usr/bin/env bash
# The HTTP/2 lesson, no cluster needed: why a Kubernetes Service does not
# balance gRPC, and what an L7 load balancer does about it.
#
# Three backends on loopback, and two load balancers over them: one in TCP
# mode (L4, a backend per connection, as kube-proxy balances a Service) and
# one in HTTP mode (L7, a backend per request). Then one HTTP/2 connection
# (curl --http2-prior-knowledge, every request a stream of that connection)
# sends N requests through each, and the spread is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${N:-300}
first_backend_port=${BACKEND_PORT:-9001}
l4_port=${L4_PORT:-9090}
l7_port=${L7_PORT:-8080}
command -v curl >/dev/null || { echo "demo-h2: curl is needed; install it (apt-get install curl)" >&2; exit 1; }

echo "==> cargo build -p backend -p loadbalancer --example h2_one_connection (the first build takes a few minutes)"
cargo build -p backend -p loadbalancer --example h2_one_connection

name=demo-h2
source scripts/processes.sh

backends=()
for i in 1 2 3; do
  port=$((first_backend_port + i - 1))
  POD_NAME=backend-$i POD_IP=127.0.0.1 RUST_LOG=warn \
    target/debug/backend --host 127.0.0.1 --port "$port" --config backend/config.json \
    >"$logs/backend-$i.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$port/readyz" $! "$logs/backend-$i.log"
  backends+=("\"127.0.0.1:$port\"")
done
list=$(IFS=,; echo "${backends[*]}")

start_lb() {
  local name=$1 port=$2 admin=$3 mode=$4
  echo "{\"port\": $port, \"adminPort\": $admin, \"mode\": \"$mode\", \"discovery\": \"static\", \"backends\": [$list], \"accessLog\": false}" \
    >"$logs/$name.json"
  echo "==> loadbalancer in $mode mode on 127.0.0.1:$port ($logs/$name.json)"
  RUST_LOG=warn target/debug/loadbalancer --host 127.0.0.1 --config "$logs/$name.json" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$admin/readyz" $! "$logs/$name.log"
}
start_lb l4 "$l4_port" $((l4_port + 1)) tcp
start_lb l7 "$l7_port" $((l7_port + 1)) http

# N requests as streams of one HTTP/2 connection; the spread by pod.
one_connection() {
  target/debug/examples/h2_one_connection "$1" "$n"
}

echo
echo "One HTTP/2 connection, $n requests, through TCP mode (L4, as a Service balances):"
one_connection "http://127.0.0.1:$l4_port/"
echo
echo "The same, through HTTP mode (L7, a backend per request):"
one_connection "http://127.0.0.1:$l7_port/"
echo
echo "L4 picks a backend once per connection, so every stream of it lands on one pod."
echo "Logs: $logs"
