// PLACEHOLDER (scalar) -- replaced by the flash-style AVX-512 kernel.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>
#include "cpu/cpu.h"
#include "cpu/scalar.h"
namespace pk::cpu {
template <typename T> static void attn_t(const AttentionParams& p) {
  const T* Q = static_cast<const T*>(p.q); const T* K = static_cast<const T*>(p.k); const T* V = static_cast<const T*>(p.v); T* O = static_cast<T*>(p.o);
  const int64_t S = p.S, D = p.D, g = p.Hq / p.Hkv;
#pragma omp parallel for collapse(2)
  for (int64_t bh = 0; bh < p.B * p.Hq; ++bh)
    for (int64_t i = 0; i < S; ++i) {
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / g;
      const int64_t qo = ((b * p.Hq + h) * S + i) * D, ko = (b * p.Hkv + hk) * S * D;
      const int64_t n = p.causal ? i + 1 : S;
      std::vector<float> s(n), acc(D, 0.f); float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) { float d = 0; for (int64_t x = 0; x < D; ++x) d += load_f(Q, qo + x) * load_f(K, ko + j * D + x); s[j] = d * p.scale; mx = std::fmax(mx, s[j]); }
      float l = 0; for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); l += s[j]; }
      for (int64_t j = 0; j < n; ++j) for (int64_t x = 0; x < D; ++x) acc[x] += s[j] * load_f(V, ko + j * D + x);
      for (int64_t x = 0; x < D; ++x) store_f(O, qo + x, acc[x] / l);
    }
}
void attention(const AttentionParams& p) {
  if (p.D != 64 && p.D != 128) throw std::invalid_argument("native cpu attention supports head dims 64 and 128, got " + std::to_string(p.D));
  if (p.dtype == DType::f32) return attn_t<float>(p);
  if (p.dtype == DType::bf16) return attn_t<bf16>(p);
  throw std::invalid_argument(std::string("native cpu attention does not support dtype ") + dtype_name(p.dtype));
}
}  // namespace pk::cpu
