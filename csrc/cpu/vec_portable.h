// Vectors for the portable tier (no intrinsics): GCC / Clang vector extensions as wide as the build's target
// SIMD (-march=native by default; 16 bytes for a baseline x86-64, aarch64 or other build), which the compiler
// maps to that target's registers, or to scalar code where it has none. Plain loops left to the
// auto-vectorizer were far slower: GCC vectorized the portable GEMM micro-kernel across its rows with
// shuffles (2048^3 fp32 at 14 GFLOP/s on 2 Zen 5 cores, 3% of the AVX-512 FMA peak).
// Header-only; no target attributes: the code takes the translation unit's flags.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace pk::cpu::pv {

#if defined(__AVX512F__)
#define PK_PV_BYTES 64
#elif defined(__AVX__)
#define PK_PV_BYTES 32
#else
#define PK_PV_BYTES 16
#endif
constexpr int kLanes = PK_PV_BYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(PK_PV_BYTES)));

inline vf load(const float* p) {  // unaligned
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
typedef int32_t vi __attribute__((vector_size(PK_PV_BYTES)));
typedef uint32_t vu __attribute__((vector_size(PK_PV_BYTES)));
typedef uint16_t vh __attribute__((vector_size(PK_PV_BYTES / 2)));
inline vf load(const uint16_t* p) {  // kLanes bf16 values, widened (exact)
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
// 2 * kLanes bf16 values as two vectors of fp32, without widening instructions: the even-numbered values
// (p[0], p[2], ...) and the odd-numbered ones, each 32-bit word split by a shift and a mask.
inline void load_bf16_pairs(const uint16_t* p, vf& even, vf& odd) {
  vu w;
  std::memcpy(&w, p, sizeof w);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  even = (vf)(w & 0xFFFF0000u);
  odd = (vf)(w << 16);
#else
  even = (vf)(w << 16);
  odd = (vf)(w & 0xFFFF0000u);
#endif
}
// Where value j of a row stands when its blocks of 2 * kLanes values are kept in load_bf16_pairs' order.
constexpr int64_t pair_pos(int64_t j) {
  return j / (2 * kLanes) * (2 * kLanes) + (j % 2) * kLanes + j % (2 * kLanes) / 2;
}
inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }  // mask ? a : b

// Reduction of the lanes by op (a + b, max): halves combined until one 16-byte vector is left, then its four
// lanes pairwise (log2 steps, no loop over lanes). op takes vectors and floats alike.
template <int B> struct Halves {
  typedef float whole __attribute__((vector_size(B)));
  typedef float half __attribute__((vector_size(B / 2)));
  template <class Op> static float reduce(whole v, Op op) {
    half lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return Halves<B / 2>::reduce(op(lo, hi), op);
  }
};
template <> struct Halves<16> {
  typedef float whole __attribute__((vector_size(16)));
  template <class Op> static float reduce(whole v, Op op) { return op(op(v[0], v[2]), op(v[1], v[3])); }
};
inline float hsum(vf v) {
  return Halves<PK_PV_BYTES>::reduce(v, [](auto a, auto b) { return a + b; });
}
// Lane-wise max that keeps a when b is NaN (as std::max(a, b)); hmax: the largest lane (a NaN lane is passed over
// unless it is the first one reduced).
template <class V> inline V max(V a, V b) { return b > a ? b : a; }
inline float hmax(vf v) {
  return Halves<PK_PV_BYTES>::reduce(v, [](auto a, auto b) { return max(a, b); });
}

// 2^x. NonPositive false (exp2): as the AVX-512 / NEON exp2_ps (same degree-6 polynomial), x clamped to 127
// above. NonPositive true (exp2_neg): for x <= 0 only (or -inf, NaN), the softmax's exponents (a score or a running
// max minus a maximum at least as large): no upper clamp, and the degree-5 polynomial the AVX-512 exp2_neg<5>
// (attn_common.h) fitted to 2^f on [-1/2, 1/2] for relative error (max 2.0e-7 in fp32, 2^0 = 1 exactly); ~17
// operations against ~24. Both: x below -126 (-inf included) gives exactly 0 (a masked score: no denormal is made),
// NaN stays NaN. Rounding to the nearest integer by adding and subtracting 1.5 * 2^23 (exact for |x| < 2^22 in the
// default rounding mode; not folded without -ffast-math, which the project does not use).
template <bool NonPositive> inline vf exp2_any(vf x) {
  const vi tiny = x < -126.f, nan = x != x;
  x = select(tiny, splat(-126.f), x);
  if constexpr (!NonPositive) x = select(x > 127.f, splat(127.f), x);
  vf n = (x + 12582912.f) - 12582912.f;
  n = select(nan, splat(0.f), n);  // no NaN reaches the integer conversion
  const vf f = x - n;
  vf p;
  if constexpr (NonPositive) {
    p = splat(1.330882078036666e-3f);
    p = p * f + 9.67151764780283e-3f;
    p = p * f + 5.550582334399223e-2f;
    p = p * f + 2.4022242426872253e-1f;
    p = p * f + 6.931470632553101e-1f;
  } else {
    p = splat(1.5403530393381606e-4f);
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
  }
  p = p * f + 1.0f;
  const vi e = __builtin_convertvector(n, vi) << 23;
  return select(tiny, splat(0.f), (vf)((vi)p + e));
}
inline vf exp2(vf x) { return exp2_any<false>(x); }
inline vf exp2_neg(vf x) { return exp2_any<true>(x); }

// One online-softmax step (base 2) of a row of n scores s (n a multiple of kLanes; keys a row does not see hold
// -inf) against the running max m and sum l: s becomes 2^(s - m_new), l = l 2^(m - m_new) + sum, m = m_new, and the
// row's accumulator o (dp floats) is rescaled by 2^(m - m_new) when the max moved (2^0 is exact: otherwise o stays).
// The max and the sum run over whole vectors (scalar loops took ~4 cycles a score on a Sapphire Rapids core). A NaN
// score is passed over by the max and reaches l and o through exp2; a row whose every score is -inf keeps m = -inf
// and gets p = 0 (2^(-inf - 0)), not NaN. The portable attention and decode.
inline void softmax_step(float* s, int64_t n, float& m, float& l, float* o, int64_t dp) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf vmx = splat(m);
  for (int64_t j = 0; j < n; j += kLanes) vmx = max(vmx, load(s + j));
  const float mx = hmax(vmx);
  const float mu = mx == ninf ? 0.f : mx;
  const float alpha = exp2_neg(splat(m - mu))[0];
  vf sum{};
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf e = exp2_neg(load(s + j) - mu);
    store(s + j, e);
    sum += e;
  }
  l = l * alpha + hsum(sum);
  m = mx;
  if (alpha != 1.f)
    for (int64_t c = 0; c < dp; c += kLanes) store(o + c, load(o + c) * alpha);
}

}  // namespace pk::cpu::pv
