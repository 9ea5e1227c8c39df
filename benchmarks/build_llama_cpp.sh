#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-quantize, the peer benchmarks/compare_servers.py runs
# beside sinkserve, from the llama-cpp-python sdist on PyPI (it vendors llama.cpp's sources).
#
#     bash benchmarks/build_llama_cpp.sh [DIR]     # default DIR: ../llamacpp
#
# Prints the llama.cpp tree it built; pass it to compare_servers.py as --llama-cpp-tree. Needs
# pip, cmake and a C++ compiler; CPU only, no curl. GGML_NATIVE's build died with SIGILL on a
# virtual machine whose CPU lists AMX (the guest may not be given it): the instruction sets are
# named instead, AVX512 with VNNI and BF16 where /proc/cpuinfo has them, else AVX2.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="$(realpath -m "${1:-$(dirname "$0")/../../llamacpp}")"
mkdir -p "$DIR"
cd "$DIR"
SDIST="llama_cpp_python-$VERSION.tar.gz"
[ -f "$SDIST" ] || python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "$SDIST"
TREE="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
ISA=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
if grep -qw avx512f /proc/cpuinfo; then
    ISA+=(-DGGML_AVX512=ON)
    grep -qw avx512_vnni /proc/cpuinfo && ISA+=(-DGGML_AVX512_VNNI=ON)
    grep -qw avx512_bf16 /proc/cpuinfo && ISA+=(-DGGML_AVX512_BF16=ON)
    grep -qw avx512vbmi /proc/cpuinfo && ISA+=(-DGGML_AVX512_VBMI=ON)
fi
rm -rf "$TREE/build"
cmake -S "$TREE" -B "$TREE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${ISA[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$TREE/build" --target llama-server llama-quantize -j "$(nproc)" >/dev/null
echo "$TREE"
