#!/bin/bash
# build harness with extra defines: mk.sh out [flags...]
out=$1; shift
cd /work/main && g++ -std=c++17 -O3 -march=native -fopenmp -Icsrc "$@" /tmp/gemmwork/hb.cpp csrc/cpu/gemm.cpp csrc/cpu/cpu_features.cpp -o $out
