#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize (CPU only, tuned for this machine) from the
# llama.cpp that the llama-cpp-python sdist on PyPI vendors, for benchmarks/bench_bundled.py.
#
#   benchmarks/build_llama_cpp.sh                    # -> /var/tmp/gptj-bench/llama.cpp/bin/
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 LLAMA_CPP_DIR=/somewhere benchmarks/build_llama_cpp.sh
#
# Idempotent: a second run with the same version finds the binaries and stops. Needs a C/C++
# compiler; cmake is taken from PATH, else installed into the repository's .venv with pip.
# Prints the folder holding the binaries on its last line.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${LLAMA_CPP_DIR:-/var/tmp/gptj-bench/llama.cpp}"
JOBS="${JOBS:-2}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
STAMP="$DIR/bin/BUILT"
WANT="llama-cpp-python $VERSION GGML_NATIVE=ON"

if [ -x "$DIR/bin/llama-bench" ] && [ -x "$DIR/bin/llama-quantize" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    echo "llama.cpp already built ($WANT)"
    echo "$DIR/bin"
    exit 0
fi

CMAKE="$(command -v cmake || true)"
if [ -z "$CMAKE" ]; then
    "$PY" -m pip install --quiet cmake
    CMAKE="$(dirname "$PY")/cmake"
fi

mkdir -p "$DIR/src"
SDIST="$DIR/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download --quiet --no-binary llama-cpp-python --no-deps \
        -d "$DIR/src" "llama-cpp-python==$VERSION"
fi
SRC="$DIR/src/llama_cpp_python-$VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC"
    tar -xzf "$SDIST" -C "$DIR/src"
fi

BUILD="$DIR/build-$VERSION"
"$CMAKE" -S "$SRC/vendor/llama.cpp" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
"$CMAKE" --build "$BUILD" --config Release --target llama-bench llama-quantize -j "$JOBS"

mkdir -p "$DIR/bin"
for exe in llama-bench llama-quantize; do
    install -m 755 "$(find "$BUILD/bin" -name "$exe" -type f | head -n 1)" "$DIR/bin/$exe"
done
echo "$WANT" > "$STAMP"
echo "$DIR/bin"
