#!/usr/bin/env bash
# `make local`: a stand-in cluster on this machine, driven by the real kubectl.
#
# The stand-in API server (fake-apiserver --local) stores the project's own
# manifests (kubectl kustomize k8s/, what kind applies) and plays the
# controllers and the kubelet for the backend Deployment: each pod is a
# backend process on a loopback address of its own. The load balancer runs
# unchanged, watching EndpointSlices through a kubeconfig, on
# 127.0.0.1:8080 (its live page on 127.0.0.1:8081).
#
# Runs until Ctrl-C or `make local-down` (from another terminal); stops
# everything it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

state=target/local
api=${API_ADDR:-127.0.0.1:6443}
for tool in kubectl curl; do
  command -v "$tool" >/dev/null || { echo "local: $tool is needed (kubectl: https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }
done

echo "==> cargo build -p backend -p loadbalancer -p fake-apiserver (the first build takes a few minutes)"
cargo build -p backend -p loadbalancer -p fake-apiserver
rm -rf "$state" && mkdir -p "$state"
kubectl kustomize k8s/ > "$state/manifests.yaml"

pids=()
stop() {
  trap - EXIT INT TERM
  echo "==> stopping the local cluster"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$state/pids"
}
trap stop EXIT INT TERM

target/debug/fake-apiserver --listen "$api" --namespace lb-demo --kubeconfig "$state/kubeconfig" \
  --local "$state/manifests.yaml" --backend target/debug/backend --state "$state" \
  > "$state/apiserver.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -s "$state/kubeconfig" ]] && break; sleep 0.1; done
[[ -s "$state/kubeconfig" ]] || { echo "local: the API server did not start:" >&2; cat "$state/apiserver.log" >&2; exit 1; }

KUBECONFIG="$state/kubeconfig" RUST_LOG=info target/debug/loadbalancer --host 127.0.0.1 \
  > "$state/loadbalancer.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:8081/readyz >/dev/null && break; sleep 0.1; done
echo "${pids[*]}" > "$state/pids"

cat <<TXT

The local cluster is up (Ctrl-C or \`make local-down\` stops it).

  export KUBECONFIG=$PWD/$state/kubeconfig
  kubectl get pods -w                         # in one terminal (or endpointslices -w)
  make distribution N=300                     # in another: the spread over the pods
  make scale REPLICAS=5                       # kubectl scale deployment/backend --replicas=5
  kubectl delete pod <name>                   # terminating, then replaced
  kubectl logs <name>                         # the pod's own output
  kubectl patch configmap backend-config --type merge \\
    -p '{"data":{"config.json":"{\\"port\\": 8080, \\"serviceName\\": \\"catalog\\"}"}}'

The load balancer: http://127.0.0.1:8080/ (its live page: http://127.0.0.1:8081/),
its log: $state/loadbalancer.log. kubectl apply, exec and port-forward need kind.
TXT
wait "${pids[0]}"
