#!/usr/bin/env bash
# Takes docs/dashboard.png: three backends and the load balancer on loopback,
# traffic through it, one backend removed from the config while it runs,
# and the admin page photographed by headless Chromium (the same invocation
# as loadbalancer/tests/integration/dashboard.rs). Everything started is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromium >/dev/null || { echo "needs chromium (apt-get install chromium)" >&2; exit 1; }

cargo build --quiet -p backend -p loadbalancer
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

for i in 1 2 3; do
  echo "{\"port\": $((9100 + i))}" >"$work/backend-$i.json"
  POD_NAME=backend-7d9f-$i POD_IP=127.0.0.1 target/debug/backend --host 127.0.0.1 \
    --config "$work/backend-$i.json" >/dev/null 2>&1 &
  pids+=($!)
done
config() { echo "{\"port\": 18180, \"adminPort\": 18181, \"discovery\": \"static\", \"backends\": [$1]}"; }
config '"127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"' >"$work/lb.json"
target/debug/loadbalancer --host 127.0.0.1 --config "$work/lb.json" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18181/readyz && break; sleep 0.1; done

for _ in 1 2 3 4; do
  (for _ in $(seq 3000); do curl -s -o /dev/null http://127.0.0.1:18180/; done) &
  pids+=($!)
done
sleep 2
config '"127.0.0.1:9101", "127.0.0.1:9102"' >"$work/lb.json.new" && mv "$work/lb.json.new" "$work/lb.json"
sleep 2
mkdir -p docs
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --no-first-run --user-data-dir="$work/chromium" \
  --window-size=1100,420 --virtual-time-budget=3000 --hide-scrollbars \
  --screenshot=docs/dashboard.png http://127.0.0.1:18181/ 2>/dev/null
echo "wrote docs/dashboard.png"
