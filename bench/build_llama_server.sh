#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp sources vendored in the llama-cpp-python
# sdist that lmscli runs on, into a cache folder outside the repository. Idempotent: prints the
# binary's path and exits at once when it is already built.
#
#   bash bench/build_llama_server.sh            # -> ~/.cache/lmscli-bench/llama-server/<ver>/build/bin/llama-server
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), LMSCLI_BENCH_CACHE (default
# ~/.cache/lmscli-bench), PYTHON (for pip; default python3), JOBS (default 2).
# CPU only, Release, default ggml CPU flags (GGML_NATIVE, as llama-cpp-python's own build);
# no OpenSSL, no web UI download, no tests or examples.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LMSCLI_BENCH_CACHE:-$HOME/.cache/lmscli-bench}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
SDIST_DIR="$CACHE/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
ROOT="$CACHE/llama-server/llama-cpp-python-$VERSION"
SRC="$ROOT/llama.cpp"
BUILD="$ROOT/build"
BIN="$BUILD/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

log() { echo "build_llama_server: $*" >&2; }

if [[ ! -f "$SDIST" ]]; then
    log "downloading the llama-cpp-python $VERSION sdist"
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
        -d "$SDIST_DIR" >&2
fi

if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    log "extracting vendor/llama.cpp"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
    # the llama.cpp commit the sdist pins (its .git is a submodule pointer we drop)
    tar -xzOf "$SDIST" "llama_cpp_python-$VERSION/.git/modules/vendor/llama.cpp/HEAD" \
        > "$ROOT/llama.cpp-commit" 2>/dev/null || true
    rm -f "$SRC/.git"
fi

log "configuring (llama.cpp $(cat "$ROOT/llama.cpp-commit" 2>/dev/null || echo '?'))"
generator=()
if command -v ninja >/dev/null; then
    generator=(-G Ninja)
fi
cmake -S "$SRC" -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF >&2

log "building llama-server with $JOBS jobs"
cmake --build "$BUILD" --target llama-server -j "$JOBS" >&2
echo "$BIN"
