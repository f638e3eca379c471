// PLACEHOLDER (scalar) -- replaced by the blocked AVX-512 kernel.
#include <stdexcept>
#include <string>
#include <vector>
#include "cpu/cpu.h"
#include "cpu/scalar.h"
namespace pk::cpu {
template <typename T> static void gemm_t(const GemmParams& p) {
  const T* A = static_cast<const T*>(p.a); const T* B = static_cast<const T*>(p.b); T* C = static_cast<T*>(p.c);
#pragma omp parallel for
  for (int64_t i = 0; i < p.M; ++i) {
    std::vector<float> acc(p.N, 0.f);
    for (int64_t k = 0; k < p.K; ++k) { float a = load_f(A, i * p.K + k); for (int64_t j = 0; j < p.N; ++j) acc[j] += a * load_f(B, k * p.N + j); }
    for (int64_t j = 0; j < p.N; ++j) store_f(C, i * p.N + j, acc[j]);
  }
}
void gemm(const GemmParams& p) {
  if (p.dtype == DType::f32) return gemm_t<float>(p);
  if (p.dtype == DType::bf16) return gemm_t<bf16>(p);
  throw std::invalid_argument(std::string("native cpu gemm does not support dtype ") + dtype_name(p.dtype));
}
}  // namespace pk::cpu
