#!/bin/sh
# Builds tools/cpu_harness/decode_hb like the extension (-O3 -march=native -fopenmp); extra flags pass
# through, e.g. `sh mk.sh -O1 -g -fsanitize=address,undefined` for a sanitizer build.
set -e
cd "$(dirname "$0")"
g++ -std=c++17 -O3 -march=native -fno-math-errno -fopenmp -I../../csrc decode_harness.cpp \
    ../../csrc/cpu/cpu_features.cpp ../../csrc/cpu/probes.cpp -o decode_hb "$@"
