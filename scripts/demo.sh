#!/usr/bin/env bash
# The local demo, no Docker needed: discovery you can watch.
#
# It runs on `make local`'s stand-in cluster: the stand-in API server
# (target/debug/fake-apiserver --local) stores the project's own manifests
# (kubectl kustomize k8s/) and plays the controllers and the kubelet for
# the backend Deployment, each pod a backend process on its own loopback IP
# (127.0.0.11, .12, ...). The load balancer runs in its default mode,
# watching the EndpointSlices of the Service `backend` through an ordinary
# kubeconfig.
#
# The script then does what a learner does with `make local`, with the
# real kubectl: scale 3 -> 5 -> 2, then break one pod's readiness and mend
# it. After each step it prints the load balancer's own `backends changed`
# line and the distribution. PAUSE=1 waits for Enter between steps.
#
# Everything it starts is stopped when it ends, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

n=${N:-60}
lb_port=${LB_PORT:-8080}
admin_port=${ADMIN_PORT:-8081}
api_port=${API_PORT:-6443}
backend_port=8080 # the Service's port, as in k8s/
command -v curl >/dev/null || { echo "demo: curl is needed; install it (apt-get install curl)" >&2; exit 1; }
if [[ $(uname) != Linux ]]; then
  echo "demo: the backends listen on 127.0.0.11-15, which only Linux routes by default;" >&2
  echo "      on macOS first run: for i in 11 12 13 14 15; do sudo ifconfig lo0 alias 127.0.0.\$i up; done" >&2
fi

echo "==> cargo build -p backend -p loadbalancer -p fake-apiserver (the first build takes a few minutes; later ones, seconds)"
cargo build -p backend -p loadbalancer -p fake-apiserver

name=demo
source scripts/processes.sh
command -v kubectl >/dev/null || { echo "demo: kubectl is needed (it builds k8s/ and drives the cluster): https://kubernetes.io/docs/tasks/tools/" >&2; exit 1; }

api=http://127.0.0.1:$api_port
slices=$api/apis/discovery.k8s.io/v1/namespaces/lb-demo/endpointslices
export KUBECONFIG=$logs/kubeconfig
kubectl kustomize k8s/ > "$logs/manifests.yaml"
echo "==> target/debug/fake-apiserver --local: the manifests of k8s/, the backend Deployment's pods as processes"
target/debug/fake-apiserver --listen "127.0.0.1:$api_port" --namespace lb-demo --kubeconfig "$KUBECONFIG" \
  --local "$logs/manifests.yaml" --backend target/debug/backend --state "$logs/cluster" \
  >"$logs/fake-apiserver.log" 2>&1 &
pids+=($!)
wait_ready "$slices" $! "$logs/fake-apiserver.log"

# Waits (at most 20 s) until the Service's slice lists N ready endpoints.
wait_endpoints() {
  local ready
  for _ in $(seq 200); do
    ready=$(kubectl get endpointslice backend-local -o jsonpath='{.endpoints[*].conditions.ready}' 2>/dev/null || true)
    [[ $(grep -o true <<<"$ready" | wc -l) -eq $1 ]] && return 0
    sleep 0.1
  done
  echo "demo: the slice never had $1 ready endpoints; see $logs/fake-apiserver.log" >&2
  exit 1
}

changes() { grep -c 'backends changed' "$logs/loadbalancer.log" || true; }

# Waits (at most 20 s) for the load balancer to log a change to TOTAL
# backends after its first SEEN changes, and prints the changes since.
show_change() {
  local seen=$1 total=$2
  for _ in $(seq 200); do
    if grep 'backends changed' "$logs/loadbalancer.log" | tail -n +$((seen + 1)) | grep -q "total=$total"; then
      echo "The load balancer logged:"
      grep 'backends changed' "$logs/loadbalancer.log" | tail -n +$((seen + 1)) | sed 's/^/  /'
      return 0
    fi
    sleep 0.1
  done
  echo "demo: the load balancer did not reach $total backends within 20 s; see $logs/loadbalancer.log" >&2
  exit 1
}

step() {
  echo
  echo "=== $1"
  if [[ ${PAUSE:-} == 1 && -t 0 ]]; then read -rp "(Enter to go on) "; fi
}

# Runs a command, says so, and shows what the load balancer made of it:
# the change to TOTAL backends, then the distribution.
act() {
  local total=$1 seen
  shift
  seen=$(changes)
  echo "==> $*"
  "$@" | sed -e 's/^/  /' -e '$a\'
  show_change "$seen" "$total"
  scripts/distribution.sh "http://127.0.0.1:$lb_port/" "$n"
}

wait_endpoints 3
echo "==> KUBECONFIG=$KUBECONFIG target/debug/loadbalancer --host 127.0.0.1 --port $lb_port --admin-port $admin_port"
RUST_LOG=info target/debug/loadbalancer --host 127.0.0.1 --port "$lb_port" --admin-port "$admin_port" \
  >"$logs/loadbalancer.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$admin_port/readyz" $! "$logs/loadbalancer.log"

echo
echo "The load balancer is watching the EndpointSlices of Service 'backend'."
echo "A watch is one long HTTP response, a JSON event per line; the first event:"
# --max-time ends the watch, which never ends by itself.
(curl -sN --max-time 1 "$slices?watch=1" || true) | cut -c1-150 | sed 's/^/  /; s/$/.../'
echo "See them all from another terminal while this runs (PAUSE=1 make demo):"
echo "  KUBECONFIG=$KUBECONFIG kubectl get endpointslices -w"
echo "Or drive the same stand-in cluster yourself: make local."

step "3 pods: the load balancer listed the slice when it started"
echo "The load balancer logged:"
grep 'backends changed' "$logs/loadbalancer.log" | sed 's/^/  /'
echo
echo "One request, with the headers (note x-served-by):"
curl -si "http://127.0.0.1:$lb_port/" | grep -iE '^(HTTP|x-served-by)|podName' | sed 's/^/  /'
scripts/distribution.sh "http://127.0.0.1:$lb_port/" "$n"

step "kubectl scale deployment/backend --replicas=5: two more pods become ready"
act 5 kubectl scale deployment/backend --replicas=5

step "kubectl scale deployment/backend --replicas=2: three pods terminate; their endpoints leave at once"
act 2 kubectl scale deployment/backend --replicas=2

pod=$(kubectl get pods -o jsonpath='{.items[0].metadata.name}')
ip=$(kubectl get pod "$pod" -o jsonpath='{.status.podIP}')
step "$pod's readiness probe fails: the kubelet marks it not ready, the slice says ready: false"
act 1 curl -sf -X POST "http://$ip:$backend_port/admin/unready"

step "$pod is ready again"
act 2 curl -sf -X POST "http://$ip:$backend_port/admin/ready"

echo "Logs: $logs"
