// PLACEHOLDER (scalar) -- replaced by the split-context AVX-512 kernel.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>
#include "cpu/cpu.h"
#include "cpu/scalar.h"
namespace pk::cpu {
template <typename T> static void dec_t(const DecodeParams& p) {
  const T* Q = static_cast<const T*>(p.q); const T* K = static_cast<const T*>(p.k); const T* V = static_cast<const T*>(p.v); T* O = static_cast<T*>(p.o);
  const int64_t D = p.D, g = p.Hq / p.Hkv;
#pragma omp parallel for
  for (int64_t bh = 0; bh < p.B * p.Hq; ++bh) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / g, n = p.context_lens[b];
    std::vector<float> s(n), acc(D, 0.f); float mx = -INFINITY;
    auto row = [&](int64_t t) { return ((decode_block(p, b, t) * p.Hkv + hk) * p.block_size + t % p.block_size) * D; };
    for (int64_t t = 0; t < n; ++t) { float d = 0; for (int64_t x = 0; x < D; ++x) d += load_f(Q, bh * D + x) * load_f(K, row(t) + x); s[t] = d * p.scale; mx = std::fmax(mx, s[t]); }
    float l = 0; for (int64_t t = 0; t < n; ++t) { s[t] = std::exp(s[t] - mx); l += s[t]; }
    for (int64_t t = 0; t < n; ++t) for (int64_t x = 0; x < D; ++x) acc[x] += s[t] * load_f(V, row(t) + x);
    for (int64_t x = 0; x < D; ++x) store_f(O, bh * D + x, acc[x] / l);
  }
}
void decode(const DecodeParams& p) {
  if (p.dtype == DType::f32) return dec_t<float>(p);
  if (p.dtype == DType::bf16) return dec_t<bf16>(p);
  throw std::invalid_argument(std::string("native cpu decode does not support dtype ") + dtype_name(p.dtype));
}
}  // namespace pk::cpu
