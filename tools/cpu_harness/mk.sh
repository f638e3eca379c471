#!/bin/sh
# Builds tools/cpu_harness/decode_hb like the extension (-O3 -march=native -fopenmp); extra flags pass
# through, e.g. `sh mk.sh -O1 -g -fsanitize=address,undefined` for a sanitizer build.
set -e
cd "$(dirname "$0")"
# decode.cpp dispatches to the AVX2 tier: decode_avx2.cpp with the extension's flags for it (CMakeLists.txt)
# and to the AMX one (decode_amx.cpp, the bf16 q.K on the amx tier)
obj=${TMPDIR:-/tmp}/pk_decode_avx2.$$.o
amx=${TMPDIR:-/tmp}/pk_decode_amx.$$.o
trap 'rm -f "$obj" "$amx"' EXIT
g++ -std=c++17 -O3 -march=native -mavx2 -mfma -mf16c -mno-avx512f -fno-math-errno -fopenmp -I../../csrc \
    -c ../../csrc/cpu/decode_avx2.cpp -o "$obj" "$@"
g++ -std=c++17 -O3 -march=native -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma \
    -fno-math-errno -fopenmp -I../../csrc -c ../../csrc/cpu/decode_amx.cpp -o "$amx" "$@"
g++ -std=c++17 -O3 -march=native -fno-math-errno -fopenmp -I../../csrc decode_harness.cpp \
    ../../csrc/cpu/cpu_features.cpp ../../csrc/cpu/probes.cpp "$obj" "$amx" -o decode_hb "$@"
