# The two commands a newcomer runs: `make demo` and `make test`. Each sets up what it needs first
# (libtorch from the torch wheel in a cached venv, the default model), idempotently: see scripts/setup.sh.

SHELL := /bin/bash
CACHE ?= $(or $(NNSIGHT_CACHE),$(HOME)/.cache/nnsight-rs)
VENV_PYTHON := $(CACHE)/venv-torch-2.13.0/bin/python
# Tests share two cores: two test threads, one libtorch thread each (set in tests/common.rs).
TEST_THREADS ?= 2

.PHONY: demo test setup setup-peer setup-redis bench bench-trace bench-generate bench-remote bench-serve bench-sweep fmt lint unit gpu-check tiny-models

## make demo: load the default model, print its module tree and the top-5 next tokens of the Eiffel prompt.
demo: setup
	cargo run --release --example quickstart

## make test: formatting, lints (clippy, rustdoc's broken links), then every test of the workspace (unit,
## integration, ui, doc). The broker tests need Debian's redis-server (setup-redis installs it).
test: setup setup-redis fmt lint unit

setup:
	@scripts/setup.sh

setup-redis:
	@scripts/setup.sh redis

setup-peer:
	@scripts/setup.sh peer

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

unit:
	cargo test --workspace -- --test-threads=$(TEST_THREADS)

## make bench: our forward against Hugging Face transformers' on the same weights, in one run.
bench: setup setup-peer
	NNSIGHT_PYTHON=$(VENV_PYTHON) cargo run --release --example bench_forward

## make bench-trace: tracing overhead (plain, empty, 1 save, 30 saves, 1 set, 2 invokes) beside Python nnsight.
bench-trace: setup setup-peer
	NNSIGHT_PYTHON=$(VENV_PYTHON) cargo run --release --example bench_trace

## make bench-generate: our plain generate (KV cache) against transformers' generate, tokens/s, in one run
## (ARGS="ROUNDS_PER_BLOCK BLOCKS MAX_NEW_TOKENS", default "5 6 10").
bench-generate: setup setup-peer
	NNSIGHT_PYTHON=$(VENV_PYTHON) cargo run --release --example bench_generate -- $(ARGS)

## make bench-sweep: a 30x9 activation-patching grid and a 270-head ablation sweep, one trace per cell against
## nnsight::patching, beside Python nnsight 0.8.1 on the same weights, in one run (ARGS="LAYERS", default 30).
bench-sweep: setup setup-peer
	NNSIGHT_PYTHON=$(VENV_PYTHON) cargo run --release --example bench_sweep -- $(ARGS)

## make bench-remote: a trace run on a server (in this process, loopback HTTP) against the same trace run here.
bench-remote: setup
	cargo run --release --example bench_remote

## make bench-serve: one SmolLM2 served here on loopback, 1, 8 and 32 concurrent clients sending trace jobs, then
## generation jobs, with co-batching off and on: jobs/s (tokens/s) and p50/p99 latency
## (ARGS="[trace|generate|both] [SECONDS]": which part, seconds per row, default both and 8).
bench-serve: setup
	cargo run --release --example bench_serve -- $(ARGS)

## make gpu-check: on a machine with a GPU, prove libtorch_cuda is linked and run the parity tests on CUDA.
gpu-check: setup
	scripts/gpu-check.sh

## make tiny-models: regenerate the tiny GPT-2 / Llama test checkpoints with transformers (committed test data).
tiny-models: setup-peer
	$(VENV_PYTHON) scripts/make_tiny_models.py
