#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize twice, for benchmarks/decode.py:
#   native: -march=native (AVX-512/VNNI/BF16 where the CPU has them)
#   avx2:   x86-64-v3 only (AVX2 + FMA + F16C + BMI2), no AVX-512, no (AVX-)VNNI, no AMX
#
# usage: benchmarks/build_llama_bench.sh LLAMA_CPP_SRC [OUT_DIR] [VARIANTS...]
#   LLAMA_CPP_SRC  a llama.cpp source tree, e.g. the llama-cpp-python sdist's vendor/llama.cpp:
#                    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/llama
#                    tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
#                    benchmarks/build_llama_bench.sh /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp
#   OUT_DIR        default benchmarks/results/llama.cpp (git-ignored); writes OUT_DIR/{native,avx2}/bin/
#   VARIANTS       default "native avx2"
# Environment: JOBS (default 2), NICE (default 19), LLAMA_COMMIT (overrides the commit recorded).
#
# The sdist is not a git checkout, so llama.cpp's build-info would say "unknown"; the commit is
# read from llama-cpp-python's CHANGELOG ("update llama.cpp to ggml-org/llama.cpp@HASH") and passed
# in as LLAMA_BUILD_COMMIT, so `llama-bench -o json` reports it. OUT_DIR/VERSION records it too.
set -euo pipefail

src=${1:?usage: $0 LLAMA_CPP_SRC [OUT_DIR] [VARIANTS...]}
src=$(cd "$src" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${2:-$repo/benchmarks/results/llama.cpp}
shift $(( $# >= 2 ? 2 : 1 ))
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(native avx2)
jobs=${JOBS:-2}
nice_level=${NICE:-19}
mkdir -p "$out"
out=$(cd "$out" && pwd)

[ -f "$src/tools/llama-bench/CMakeLists.txt" ] || { echo "not a llama.cpp tree: $src" >&2; exit 1; }

# Version: the sdist's version plus the llama.cpp commit its CHANGELOG names for that version.
sdist_dir=$(cd "$src/../.." && pwd)
sdist_version=""
commit=${LLAMA_COMMIT:-}
if [ -f "$sdist_dir/CHANGELOG.md" ]; then
    sdist_version=$(grep -m1 -oE '^## \[[0-9][^]]*\]' "$sdist_dir/CHANGELOG.md" | tr -d '#[] ' || true)
    if [ -z "$commit" ]; then
        # first "llama.cpp@HASH" after the first released-version header
        commit=$(awk '/^## \[[0-9]/{inrel=1} inrel && match($0, /llama\.cpp@[0-9a-f]+/) {
                      print substr($0, RSTART + 10, RLENGTH - 10); exit }' "$sdist_dir/CHANGELOG.md")
    fi
fi
commit=${commit:-unknown}

common_flags=(
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_OPENMP=ON
    -DGGML_BACKEND_DL=OFF
    -DGGML_CPU_ALL_VARIANTS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_COMMIT="$commit"
)
# x86-64-v3 without anything AVX-512-era. BMI2 stays on: it is part of x86-64-v3 (Haswell+),
# not tied to AVX-512. AMX and AVX512-VBMI default off but are spelled out so a future default
# change cannot leak them in.
avx2_flags=(
    -DGGML_NATIVE=OFF
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX_VNNI=OFF
    -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)

for v in "${variants[@]}"; do
    case $v in
        native) isa_flags=(-DGGML_NATIVE=ON) ;;
        avx2) isa_flags=("${avx2_flags[@]}") ;;
        *) echo "unknown variant: $v (native|avx2)" >&2; exit 1 ;;
    esac
    build="$out/$v/build"
    echo "== llama.cpp $v build in $build" >&2
    nice -n "$nice_level" cmake -S "$src" -B "$build" "${common_flags[@]}" "${isa_flags[@]}" >"$out/$v.cmake.log" 2>&1 \
        || { tail -30 "$out/$v.cmake.log" >&2; exit 1; }
    nice -n "$nice_level" cmake --build "$build" --target llama-bench llama-quantize -j "$jobs" >"$out/$v.build.log" 2>&1 \
        || { tail -30 "$out/$v.build.log" >&2; exit 1; }
    mkdir -p "$out/$v/bin"
    cp "$build/bin/llama-bench" "$build/bin/llama-quantize" "$out/$v/bin/"
    # what the compiler was actually told, for the record (e.g. to check no -mavx512* in avx2)
    grep -oE -- '-march=native|-m(sse4\.2|avx[0-9a-z]*|fma|f16c|bmi2|amx-[a-z0-9]+)\b' "$build/build.ninja" \
        | sort -u | tr '\n' ' ' >"$out/$v/arch_flags.txt" || true
    echo "== $v: $out/$v/bin/llama-bench" >&2
done

{
    echo "llama-cpp-python sdist: ${sdist_version:-unknown}"
    echo "llama.cpp commit: $commit"
    echo "source: $src"
    echo "compiler: $(${CXX:-c++} --version | head -1)"
} >"$out/VERSION"
cat "$out/VERSION" >&2
