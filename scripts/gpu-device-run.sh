#!/usr/bin/env bash
# Runs on a lent GPU machine the binaries that scripts/gpu-cross-build.sh staged in .gpu/ (built against the
# image's torch 2.11): CUDA availability, then the tests on cuda:0 (SmolLM2 ones when the model parts are there).
set -u
TL=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
mkdir -p /tmp/t211/torch && ln -sfn "$TL" /tmp/t211/torch/lib            # the binaries' rpath
mkdir -p /tmp/gpubuild && ln -sfn "$PWD" /tmp/gpubuild/repo              # the tests' data path
nvidia-smi --query-gpu=name --format=csv,noheader
chmod +x .gpu/bin/*
echo "== device_info"; .gpu/bin/device_info --require-cuda; echo "rc=$?"
echo "== integration tests on cuda:0"
NNSIGHT_TEST_DEVICE=cuda .gpu/bin/integration --test-threads=1 tiny_models graph_runtime linking \
  intervene::reading intervene::an_edit intervene::slices intervene::toy intervene::graphs intervene::an_error 2>&1 | tail -40
if [ -f /tmp/part00 ] && [ -f .gpu2/part01 ]; then
  mkdir -p models && cat /tmp/part00 .gpu2/part01 > models/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum models/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "== SmolLM2 parity on cuda:0"
  NNSIGHT_TEST_DEVICE=cuda .gpu/bin/integration --test-threads=1 --nocapture parity_smollm2 intervene::batching intervene::patching intervene::an_ad_hoc intervene::zeroing 2>&1 | grep -E "^test |test result|layer (0|11|29):|logits|row" | tail -40
fi
