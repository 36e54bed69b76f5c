# Every target prints the commands it runs. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := bash

.PHONY: help test build run-backend

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

test: ## Format check, lints, and every test (what CI runs)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

build: ## Build both binaries (release)
	cargo build --release --workspace

run-backend: ## Run one backend on :8080 with backend/config.json
	cargo run -p backend -- --config backend/config.json
