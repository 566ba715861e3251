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
# Everything is built once for the whole workspace: building one package alone (`cargo run -p`)
# unifies features differently and would compile most dependencies a second time.
TRIBUTARY_CLI := $(CARGO_TARGET_DIR)/debug/tributary

LOCAL := deploy/local
WITH_STACK := $(LOCAL)/with-stack.sh

.PHONY: help up down status demo test lint schemas manifests bench build

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## Fetch (first time) and start Kafka, the registry and Tryton; wait until healthy
	$(LOCAL)/up.sh

down: ## Stop the local stack (data kept; `deploy/local/down.sh --purge` wipes it)
	$(LOCAL)/down.sh

status: ## Health of each stack component
	$(LOCAL)/status.sh

build: ## Build every binary and test
	cargo build --workspace --bins --tests

demo: ## Run the demo scenario on the local stack (so far: usage over HTTP into usage-ingest, totals out)
	$(LOCAL)/up.sh
	cargo build --workspace --bins
	. $(LOCAL)/env.sh && $(TRIBUTARY_CLI) --registry-url "$$TRIBUTARY_REGISTRY_URL" schemas register
	$(LOCAL)/status.sh
	$(LOCAL)/demo.sh

lint: ## rustfmt and clippy, warnings as errors
	cargo fmt --all -- --check
	cargo clippy $(CLIPPY_FLAGS)

schemas: build ## Offline schema gates: conventions, and FULL_TRANSITIVE against every released version
	python3 schemas/check_conventions.py
	$(TRIBUTARY_CLI) schemas check

manifests: build ## Kubernetes manifests: API schemas, consistency, configs accepted by the services
	py=$$(tests/python/setup.sh | tail -1) && "$$py" deploy/k8s/check.py --bin-dir "$(CARGO_TARGET_DIR)/debug" --self-test

test: build lint schemas manifests ## Every test, unit and end-to-end; starts the stack if needed and stops what it started
	$(WITH_STACK) cargo test --workspace --no-fail-fast

bench: ## Benchmarks (codec, then the runtime and the services against the local stack); results in BENCHMARKS.md
	cargo bench -p tributary-contracts --bench codec
	$(WITH_STACK) cargo bench -p tributary-tests --bench runtime
	$(WITH_STACK) cargo bench -p tributary-tests --bench usage_ingest
	$(WITH_STACK) cargo bench -p tributary-tests --bench billing_router
	$(WITH_STACK) cargo bench -p tributary-tests --bench erp_poster
	$(WITH_STACK) cargo bench -p tributary-tests --bench webhooks
	$(WITH_STACK) cargo bench -p tributary-tests --bench entitlement_watcher
	cargo bench -p tributary-tests --bench renewal_notifier
