#!/usr/bin/env bash
# Installs what `make test` needs besides Rust (scripts/test-deps.list), or
# says what to install. Idempotent: with everything present it prints one
# line and changes nothing. Run by `make test` and by `.ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."

# `make test` runs cargo fmt and cargo clippy first.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if ! command -v rustup >/dev/null; then
      echo "make test: cargo's $component is missing; install it with your Rust toolchain" >&2
      exit 1
    fi
    echo "make test: adding the $component component (rustup component add $component)"
    rustup component add "$component"
  fi
done

# The packages of scripts/test-deps.list whose command is missing, once each
# (one package may provide several commands).
missing_packages() {
  while read -r tool package; do
    [[ -z "$tool" || "$tool" == \#* ]] && continue
    command -v "$tool" >/dev/null || echo "$package"
  done < scripts/test-deps.list | awk '!seen[$0]++'
}
mapfile -t missing < <(missing_packages)

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "make test: missing packages its tests start: ${missing[*]}" >&2
    echo "install them first: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "make test: installing what its tests start: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  mapfile -t still < <(missing_packages)
  if ((${#still[@]})); then
    echo "make test: still missing after apt-get install: ${still[*]}" >&2
    exit 1
  fi
fi

# kubectl is not a Debian package new enough (the manifest tests run
# kubectl kustomize on every kustomization, with kustomize v5).
if ! command -v kubectl >/dev/null; then
  echo "make test: kubectl is missing; the manifest tests need kubectl 1.27 or newer: https://kubernetes.io/docs/tasks/tools/" >&2
  exit 1
fi
echo "make test: every tool the tests start is here (scripts/test-deps.list, and kubectl)"
