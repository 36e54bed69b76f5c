#!/usr/bin/env bash
# The local demo, no cluster needed: discovery you can watch.
#
# A stand-in for the Kubernetes API (target/debug/fake-apiserver) serves
# EndpointSlices over the real list/watch protocol. The load balancer runs
# in its default mode, watching the EndpointSlices of the Service `backend`,
# and reaches the stand-in through an ordinary kubeconfig. Backends are
# processes on their own loopback IPs (127.0.0.11, .12, ...), all on port
# 8080, as pods each have an IP and share a container port.
#
# On kind, the kubelet runs the pods and the EndpointSlice controller writes
# the slice. Here this script plays both: it starts and stops backends and
# PUTs the slice, scaling 3 -> 5 -> 2, then breaking one and mending it.
# After each step it prints the load balancer's own `backends changed` line
# and the distribution. PAUSE=1 waits for Enter between steps.
#
# Everything it starts is stopped when it ends, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${N:-60}
lb_port=${LB_PORT:-8080}
admin_port=${ADMIN_PORT:-8081}
api_port=${API_PORT:-6443}
backend_port=8080 # the Service's port, as in k8s/
namespace=demo
command -v curl >/dev/null || { echo "demo: curl is needed; install it (apt-get install curl)" >&2; exit 1; }
if [[ $(uname) != Linux ]]; then
  echo "demo: the backends listen on 127.0.0.11-15, which only Linux routes by default;" >&2
  echo "      on macOS first run: for i in 11 12 13 14 15; do sudo ifconfig lo0 alias 127.0.0.\$i up; done" >&2
fi

echo "==> cargo build -p backend -p loadbalancer -p fake-apiserver (the first build takes a few minutes; later ones, seconds)"
cargo build -p backend -p loadbalancer -p fake-apiserver

name=demo
source scripts/processes.sh

api=http://127.0.0.1:$api_port
slices=$api/apis/discovery.k8s.io/v1/namespaces/$namespace/endpointslices
echo "==> target/debug/fake-apiserver --listen 127.0.0.1:$api_port --kubeconfig $logs/kubeconfig"
target/debug/fake-apiserver --listen "127.0.0.1:$api_port" --namespace "$namespace" \
  --kubeconfig "$logs/kubeconfig" >"$logs/fake-apiserver.log" 2>&1 &
pids+=($!)
wait_ready "$slices" $! "$logs/fake-apiserver.log"

# Pods 1-5, started on demand; backend_pids[i] is pod i's process.
backend_pids=()
start_pod() {
  local i=$1
  POD_NAME=backend-$i POD_IP=127.0.0.1$i POD_NAMESPACE=$namespace \
    target/debug/backend --host "127.0.0.1$i" --port $backend_port --config backend/config.json \
    >"$logs/backend-$i.log" 2>&1 &
  pids+=($!)
  backend_pids[$i]=$!
  wait_ready "http://127.0.0.1$i:$backend_port/readyz" $! "$logs/backend-$i.log"
}
stop_pod() {
  kill -TERM "${backend_pids[$1]}" 2>/dev/null || true
  wait "${backend_pids[$1]}" 2>/dev/null || true
}

# PUTs the Service's one EndpointSlice: an endpoint per pod number given,
# ready unless it is in NOT_READY.
put_slice() {
  local endpoints=() i ready
  for i in "$@"; do
    ready=true
    [[ " ${NOT_READY:-} " == *" $i "* ]] && ready=false
    endpoints+=("{\"addresses\":[\"127.0.0.1$i\"],\"conditions\":{\"ready\":$ready},\"targetRef\":{\"kind\":\"Pod\",\"name\":\"backend-$i\"}}")
  done
  local list
  list=$(IFS=,; echo "${endpoints[*]}")
  curl -sf -X PUT -H 'content-type: application/json' "$slices/backend-demo" -o /dev/null -d @- <<EOF
{"metadata": {"name": "backend-demo", "labels": {"kubernetes.io/service-name": "backend"}},
 "addressType": "IPv4",
 "ports": [{"name": "http", "port": $backend_port, "protocol": "TCP"}],
 "endpoints": [$list]}
EOF
}

changes() { grep -c 'backends changed' "$logs/loadbalancer.log" || true; }

# Waits (at most 10 s) for the load balancer to log a change after `seen`,
# and prints it.
show_change() {
  local seen=$1
  for _ in $(seq 100); do
    if (($(changes) > seen)); then
      echo "The load balancer logged:"
      grep 'backends changed' "$logs/loadbalancer.log" | tail -n +$((seen + 1)) | sed 's/^/  /'
      return 0
    fi
    sleep 0.1
  done
  echo "demo: the load balancer did not see the change within 10 s; see $logs/loadbalancer.log" >&2
  exit 1
}

step() {
  echo
  echo "=== $1"
  if [[ ${PAUSE:-} == 1 && -t 0 ]]; then read -rp "(Enter to go on) "; fi
}

# Puts the slice for pods "$@" and shows what the load balancer made of it.
publish() {
  local seen
  seen=$(changes)
  echo "==> PUT $slices/backend-demo (endpoints: $*${NOT_READY:+; not ready: $NOT_READY})"
  put_slice "$@"
  show_change "$seen"
  scripts/distribution.sh "http://127.0.0.1:$lb_port/" "$n"
}

for i in 1 2 3; do start_pod $i; done
put_slice 1 2 3

echo "==> KUBECONFIG=$logs/kubeconfig target/debug/loadbalancer --host 127.0.0.1 --port $lb_port --admin-port $admin_port"
KUBECONFIG=$logs/kubeconfig RUST_LOG=info \
  target/debug/loadbalancer --host 127.0.0.1 --port "$lb_port" --admin-port "$admin_port" \
  >"$logs/loadbalancer.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$admin_port/readyz" $! "$logs/loadbalancer.log"

cat <<EOF

The load balancer is watching the EndpointSlices of Service 'backend'.
A watch is one long HTTP response, a JSON event per line; the first event:
EOF
# --max-time ends the watch, which never ends by itself.
(curl -sN --max-time 1 "$slices?watch=1" || true) | cut -c1-150 | sed 's/^/  /; s/$/.../'
cat <<EOF
See them all from another terminal while this runs (PAUSE=1 make demo):
  curl -N '$slices?watch=1'
On kind the real API server and the EndpointSlice controller do this.
EOF

step "3 pods: the load balancer listed the slice when it started"
echo "The load balancer logged:"
grep 'backends changed' "$logs/loadbalancer.log" | sed 's/^/  /'
echo
echo "One request, with the headers (note x-served-by):"
curl -si "http://127.0.0.1:$lb_port/" | grep -iE '^(HTTP|x-served-by)|podName' | sed 's/^/  /'
scripts/distribution.sh "http://127.0.0.1:$lb_port/" "$n"

step "kubectl scale deployment/backend --replicas=5: two more pods become ready"
for i in 4 5; do start_pod $i; done
publish 1 2 3 4 5

step "kubectl scale deployment/backend --replicas=2: three pods leave the slice, then stop"
publish 1 2
for i in 3 4 5; do stop_pod $i; done

step "backend-2's readiness probe fails: the kubelet marks it not ready, the slice says ready: false"
curl -sf -X POST "http://127.0.0.12:$backend_port/admin/unready" -o /dev/null
NOT_READY=2 publish 1 2

step "backend-2 is ready again"
curl -sf -X POST "http://127.0.0.12:$backend_port/admin/ready" -o /dev/null
publish 1 2

echo "Logs: $logs"
