# Every target prints the commands it runs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := bash

N ?= 100
URL ?= http://localhost:8080/

.PHONY: help demo test build run-backend run-loadbalancer distribution bench

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

demo: ## Local demo, no cluster: 3 backends + load balancer on loopback, distribution printed
	scripts/demo.sh

test: ## Format check, lints, and every test (what CI runs)
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

bench: ## Benchmark the load balancer against direct and nginx (installs wrk, nginx)
	python3 scripts/bench.py
	cargo bench -p loadbalancer --bench convergence
