# Tributary: every task a developer or CI runs. `make help` lists them.
#
# The local stack (Kafka, Apicurio Registry, Tryton) runs without Docker from deploy/local/;
# its addresses are exported from deploy/local/env.sh to every recipe below.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Build output outside the checkout, shared by every clone on the machine (CI reuses it).
export CARGO_TARGET_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tributary/target
# Warnings are errors in CI builds and lints.
CLIPPY_FLAGS := --workspace --all-targets -- -D warnings

LOCAL := deploy/local
WITH_STACK := $(LOCAL)/with-stack.sh

.PHONY: help up down status demo test lint schemas bench build

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## Fetch (first time) and start Kafka, the registry and Tryton; wait until healthy
	$(LOCAL)/up.sh

down: ## Stop the local stack (data kept; `deploy/local/down.sh --purge` wipes it)
	$(LOCAL)/down.sh

status: ## Health of each stack component
	$(LOCAL)/status.sh

build: ## Build every binary
	cargo build --workspace --bins

demo: ## Run the demo scenario on the local stack (for now: start the stack, register the contracts, report health)
	$(LOCAL)/up.sh
	. $(LOCAL)/env.sh && cargo run --quiet -p tributary-cli -- --registry-url "$$TRIBUTARY_REGISTRY_URL" schemas register
	$(LOCAL)/status.sh

lint: schemas ## rustfmt and clippy (warnings as errors), and the schema gates
	cargo fmt --all -- --check
	cargo clippy $(CLIPPY_FLAGS)

schemas: ## Offline schema gates: conventions, and FULL_TRANSITIVE against every released version
	python3 schemas/check_conventions.py
	cargo run --quiet -p tributary-cli -- schemas check

test: lint ## Every test, unit and end-to-end; starts the stack if needed and stops what it started
	cargo build --workspace --bins --tests
	$(WITH_STACK) cargo test --workspace --no-fail-fast

bench: ## Benchmarks (codec, then the runtime against the local stack); results in BENCHMARKS.md
	cargo bench -p tributary-contracts --bench codec
	$(WITH_STACK) cargo bench -p tributary-tests --bench runtime
