#!/bin/sh
# Builds tools/cpu_harness/decode_hb like the extension (-O3 -march=native -fopenmp); extra flags pass
# through, e.g. `sh mk.sh -O1 -g -fsanitize=address,undefined` for a sanitizer build.
set -e
cd "$(dirname "$0")"
# decode.cpp dispatches to the AVX2 tier: decode_avx2.cpp with the extension's flags for it (CMakeLists.txt)
# -fPIC -ftls-model=global-dynamic: the extension's code generation around thread-locals (in the shared library
# every read is a __tls_get_addr call, around which GCC spills the vector registers); without them the harness
# reads thread-locals as plain %fs loads and missed a read beside every prefetch of the AVX2 decode that cost it
# ~40% in Python (notes/cpu_decode.md, seventeenth session)
PIC="-fPIC -ftls-model=global-dynamic"
obj=${TMPDIR:-/tmp}/pk_decode_avx2.$$.o
trap 'rm -f "$obj"' EXIT
g++ -std=c++17 -O3 -march=native -mavx2 -mfma -mf16c -mno-avx512f -fno-math-errno -fopenmp $PIC -I../../csrc \
    -c ../../csrc/cpu/decode_avx2.cpp -o "$obj" "$@"
g++ -std=c++17 -O3 -march=native -fno-math-errno -fopenmp $PIC -I../../csrc decode_harness.cpp \
    ../../csrc/cpu/cpu_features.cpp ../../csrc/cpu/probes.cpp "$obj" -o decode_hb "$@"
