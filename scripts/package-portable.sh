#!/usr/bin/env bash
# Builds falcon-infer and falcon-quantize with ggml's backends loaded at run time (the
# `dynamic-backends` feature) and gathers them, llama.cpp's shared libraries and every backend
# library into one directory. Copy that directory to any x86-64 Linux machine: the binaries start
# and run on the CPU without a GPU driver, and use the GPU where the GPU backend can load.
#
# usage: scripts/package-portable.sh OUT_DIR [FEATURES]
#   FEATURES: more cargo features, e.g. `cuda` to include the CUDA backend (needs the full CUDA
#   toolkit; set CMAKE_CUDA_ARCHITECTURES to build only for your GPUs, see README.md).
# The build goes to target/portable (CARGO_TARGET_DIR overrides), apart from other builds.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [FEATURES]}
features=dynamic-backends${2:+,$2}
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target/portable}
cargo build --release --locked --features "$features" --target-dir "$target" \
    --bin falcon-infer --bin falcon-quantize
release=$target/release
# The backend modules are installed in llama-cpp-sys-2's build directory: take the newest.
backends=$(ls -dt "$release"/build/llama-cpp-sys-2-*/out/backends 2>/dev/null | head -n 1)
if [ -z "$backends" ] || ! ls "$backends"/libggml-*.so >/dev/null 2>&1; then
    echo "package-portable: no backend libraries found under $release/build" >&2
    exit 1
fi
mkdir -p "$out"
cp "$release/falcon-infer" "$release/falcon-quantize" "$out/"
# llama.cpp's libraries under the names the binaries ask for (libllama.so.0, ...), as files.
cp -L "$backends"/../lib/lib*.so.[0-9] "$out/"
cp "$backends"/libggml-*.so "$out/"
echo "package-portable: $(ls "$out" | wc -l) files in $out"
