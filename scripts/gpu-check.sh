#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build, check that tch sees CUDA (libtorch_cuda kept linked by
# nnsight/build.rs), and run the SmolLM2 and tiny-model parity tests on Device::Cuda(0).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example device_info
target/release/examples/device_info --require-cuda
NNSIGHT_TEST_DEVICE=cuda cargo test --release --test integration -- --test-threads=1 parity_smollm2 tiny_models linking
