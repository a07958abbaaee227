#!/usr/bin/env bash
# For this workplace's lent GPU machines, whose image has torch 2.11 and no Rust toolchain (and no network):
# build the test binaries HERE against the torch 2.11 wheel's libtorch (tch 0.26 expects 2.13; the 15 generated
# bindings that 2.11 lacks or declares differently are stubbed to throw), stage them in .gpu/, then run
# scripts/gpu-device-run.sh THERE (device tool: carry .gpu; for the SmolLM2 tests also the model, split in two
# parts of < 64 MiB: .gpu1/part00 copied to /tmp/part00 by a first call, .gpu2/part01 carried by the second).
# On a machine with torch 2.13 and cargo, use scripts/gpu-check.sh (`make gpu-check`) instead.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${GPU_WORK:-/tmp/gpubuild}
T=${TORCH211:-/tmp/t211}
mkdir -p "$W" "$T"
if [ ! -d "$T/torch/lib" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$T" torch==2.11.0
    (cd "$T" && unzip -q -o torch-2.11.0-*.whl 'torch/lib/*' 'torch/include/*')
fi
rm -rf "$W/repo" "$W/torch-sys"
git clone -q "$ROOT" "$W/repo"
cp -r "$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-0.26.0 | head -n1)" "$W/torch-sys"
python3 - "$W/torch-sys/libtch/torch_api_generated.cpp" <<'PY'
import re, sys
p = sys.argv[1]
missing = ["_flash_attention_forward_no_dropout_inplace", "_philox_key_fold_in", "_philox_key_split",
           "_philox_normal", "_philox_normal_", "_philox_normal_out", "_philox_uniform", "_philox_uniform_",
           "_philox_uniform_out", "_upsample_lanczos2d_aa", "_upsample_lanczos2d_aa_backward",
           "_upsample_lanczos2d_aa_backward_out", "_upsample_lanczos2d_aa_out",
           "_scaled_dot_product_attention_math_for_mps"]
s = open(p).read()
def repl(m):
    if any(re.search(r"torch::" + re.escape(f) + r"\(", m.group(2)) for f in missing):
        return m.group(1) + '  PROTECT(\n    throw std::runtime_error("not available in this libtorch");\n  )\n}\n'
    return m.group(0)
open(p, "w").write(re.sub(r"(void atg_[a-z0-9_]+\([^)]*\) \{\n)(  PROTECT\(.*?\n  \)\n\}\n)", repl, s, flags=re.S))
PY
printf '\n[patch.crates-io]\ntorch-sys = { path = "../torch-sys" }\n' >> "$W/repo/Cargo.toml"
ln -sfn "$T/torch" "$W/repo/.libtorch"
# LIBTORCH exported: it wins over the block the set-up registers with cargo (which names torch 2.13).
(cd "$W/repo" && LIBTORCH="$W/repo/.libtorch" CARGO_TARGET_DIR="$W/target" RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
    cargo build --release --tests --example device_info -p nnsight)
rm -rf "$ROOT/.gpu" && mkdir -p "$ROOT/.gpu/bin"
cp "$(ls "$W"/target/release/deps/integration-* | grep -v '\.d$' | head -n1)" "$ROOT/.gpu/bin/integration"
cp "$W/target/release/examples/device_info" "$ROOT/.gpu/bin/"
strip "$ROOT/.gpu/bin/"*
cp "$ROOT/scripts/gpu-device-run.sh" "$ROOT/.gpu/run.sh"
echo "staged $(du -sh "$ROOT/.gpu" | cut -f1) in .gpu/ (add /.gpu/ to .git/info/exclude); on the device: bash .gpu/run.sh"
