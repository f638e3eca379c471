// Entry points of the CPU kernels (csrc/cpu/*.cpp). Inputs were checked by csrc/bindings.cpp;
// unsupported dtypes or head dims throw std::invalid_argument (a ValueError in Python).
#pragma once
#include "common/params.h"

namespace pk::cpu {

struct Features {
  bool avx2_fma;
  bool avx512f;      // F + BW + VL + DQ
  bool avx512_bf16;
  bool amx_bf16;     // CPUID says so and the OS granted the tile-data permission
};
const Features& features();

void gemm(const GemmParams& p);
void attention(const AttentionParams& p);
void decode(const DecodeParams& p);

int max_threads();

}  // namespace pk::cpu
