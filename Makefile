# Every target prints the commands it runs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := bash

# Images are tagged with the workspace version from Cargo.toml, never :latest.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
BACKEND_IMAGE := lb-demo/backend:$(VERSION)
LOADBALANCER_IMAGE := lb-demo/loadbalancer:$(VERSION)
CLUSTER := lb-demo
NAMESPACE := lb-demo
KUBECTL := kubectl --namespace $(NAMESPACE)

N ?= 100
URL ?= http://localhost:8080/
REPLICAS ?= 5

# $(call need,tool): stop with a clear message when a tool is missing.
need = @command -v $(1) >/dev/null 2>&1 || { echo "make: '$(1)' is not installed; it is needed for this target (see README: Run it on kind)" >&2; exit 1; }

.PHONY: help demo demo-h2 local local-down test build run-backend run-loadbalancer distribution bench bench-figures \
        up cluster images load deploy curl port-forward dashboard scale slow-pod shared-counter \
        servers pods crd logs down

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# === Local, no cluster ===

demo: ## Scripted demo on the local stand-in cluster (no Docker): kubectl scale 3 -> 5 -> 2, one pod unready, the spread after each step
	scripts/demo.sh

local: ## A local stand-in cluster, no Docker: drive it with the real kubectl (Ctrl-C or make local-down stops it)
	scripts/local.sh

local-down: ## Stop what make local started
	@test -f target/local/pids || { echo "make: no local cluster is running (no target/local/pids)"; exit 0; }
	kill $$(cat target/local/pids)

demo-h2: ## Local demo: one HTTP/2 connection through L4 (all on one pod) and L7 (spread per request)
	scripts/demo-h2.sh

test: ## Format check, lints, and every test (what CI runs); installs the tools the tests start (apt, as root)
	scripts/test-deps.sh
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

build: ## Build both binaries (release)
	cargo build --release --workspace

run-backend: ## Run one backend on :8080 with backend/config.json
	cargo run -p backend -- --config backend/config.json

run-loadbalancer: ## Run the load balancer on :8080 over backends on :9001-9003 (loadbalancer/config.json)
	cargo run -p loadbalancer -- --config loadbalancer/config.json

distribution: ## Send N requests to URL and print the spread over pods (URL=... N=...)
	scripts/distribution.sh "$(URL)" "$(N)"

bench: ## Benchmark against direct, nginx and HAProxy (HTTP/1.1, TCP mode, HTTP/2), and discovery convergence; results in target/bench/
	python3 scripts/bench.py
	python3 scripts/bench_algorithms.py
	python3 scripts/bench_tcp.py
	python3 scripts/bench_h2.py
	cargo bench -p loadbalancer --bench convergence

bench-figures: ## Copy the chart of the last `make bench` into docs/ (committed on purpose, with docs/benchmarks.md)
	@test -f target/bench/algorithms.svg || { echo "make: run make bench first (no target/bench/algorithms.svg)" >&2; exit 1; }
	cp target/bench/algorithms.svg docs/algorithms.svg

# === On kind (needs docker, kind, kubectl) ===

up: cluster images load deploy ## Everything: cluster, images, load, deploy

cluster: ## Create the kind cluster (localhost:8080 -> the load balancer's NodePort)
	$(call need,kind)
	kind get clusters 2>/dev/null | grep -qx '$(CLUSTER)' || kind create cluster --config kind-config.yaml --name $(CLUSTER)

images: ## Build both images, tagged with the version in Cargo.toml
	$(call need,docker)
	docker build --target backend -t $(BACKEND_IMAGE) .
	docker build --target loadbalancer -t $(LOADBALANCER_IMAGE) .

load: ## Load both images into the kind nodes (no registry needed)
	$(call need,kind)
	$(call need,docker)
	for image in $(BACKEND_IMAGE) $(LOADBALANCER_IMAGE); do \
	  echo "kind load docker-image $$image --name $(CLUSTER)"; \
	  kind load docker-image $$image --name $(CLUSTER) && continue; \
	  echo "kind load docker-image failed (Docker's containerd image store?); retrying through an archive"; \
	  archive=$$(mktemp) && docker save -o $$archive $$image && \
	    kind load image-archive $$archive --name $(CLUSTER) && rm -f $$archive || exit 1; \
	done

deploy: ## Apply k8s/ (kustomize) and wait for both rollouts
	$(call need,kubectl)
	kubectl apply -k k8s/
	$(KUBECTL) rollout status deployment/backend --timeout=180s
	$(KUBECTL) rollout status deployment/loadbalancer --timeout=180s
	$(KUBECTL) rollout status deployment/loadbalancer-tcp --timeout=180s

curl: ## One request through the load balancer on kind, with headers
	$(call need,curl)
	curl -si $(URL)

port-forward: ## Alternative to the NodePort mapping: forward localhost:8080 to the load balancer
	$(call need,kubectl)
	$(KUBECTL) port-forward service/loadbalancer 8080:8080

dashboard: ## The live page of the distribution: forwards localhost:8081 to the load balancer's admin port
	$(call need,kubectl)
	@echo "open http://localhost:8081/ (Ctrl-C to stop)"
	$(KUBECTL) port-forward deployment/loadbalancer 8081:8081

scale: ## Scale the backend Deployment (REPLICAS=n, default 5)
	$(call need,kubectl)
	$(KUBECTL) scale deployment/backend --replicas=$(REPLICAS)
	$(KUBECTL) rollout status deployment/backend --timeout=180s

slow-pod: ## Add one backend pod that answers 50 ms late (the algorithms lesson)
	$(call need,kubectl)
	kubectl apply -k k8s/overlays/slow-pod
	$(KUBECTL) rollout status deployment/backend-slow --timeout=180s

shared-counter: ## Two load balancer replicas sharing one round-robin counter in Redis
	$(call need,kubectl)
	kubectl apply -k k8s/overlays/shared-counter
	$(KUBECTL) rollout status deployment/redis --timeout=180s
	$(KUBECTL) rollout status deployment/loadbalancer --timeout=180s

servers: ## Backends as Server custom resources, health written to their status (kubectl get servers -w)
	$(call need,kubectl)
	kubectl apply -f k8s/crd/servers.yaml
	kubectl wait --for condition=established --timeout=60s crd/servers.lb.example.com
	kubectl apply -k k8s/overlays/servers
	$(KUBECTL) rollout status statefulset/server --timeout=180s
	$(KUBECTL) rollout restart deployment/loadbalancer
	$(KUBECTL) rollout status deployment/loadbalancer --timeout=180s

pods: ## The load balancer finds the backend pods by label selector instead of EndpointSlices
	$(call need,kubectl)
	kubectl apply -k k8s/overlays/pods
	$(KUBECTL) rollout restart deployment/loadbalancer
	$(KUBECTL) rollout status deployment/loadbalancer --timeout=180s

crd: ## Regenerate k8s/crd/servers.yaml from the Rust type (a test fails while they differ)
	UPDATE_CRD=1 cargo test -p loadbalancer --test integration manifests::the_server_crd

logs: ## Follow the load balancer's logs
	$(call need,kubectl)
	$(KUBECTL) logs deployment/loadbalancer --follow

down: ## Delete the kind cluster
	$(call need,kind)
	kind delete cluster --name $(CLUSTER)
