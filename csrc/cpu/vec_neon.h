// NEON (aarch64 Advanced SIMD) helpers of the neon tier's kernels (gemm.cpp, attention_neon.cpp,
// decode_neon.cpp): 4-lane fp32 loads and stores that widen / round bf16, exp2, a 4 x 4 transpose.
// ARMv8.0 only (no SVE, no BF16 extension). Include only under __aarch64__.
#pragma once
#include <arm_neon.h>

#include <cstdint>

#define PK_NEON_INLINE inline __attribute__((always_inline))

namespace pk::cpu::neon {

// 4 values at p as fp32 (bf16 widened exactly: a 16-bit shift).
PK_NEON_INLINE float32x4_t load4(const float* p) { return vld1q_f32(p); }
PK_NEON_INLINE float32x4_t load4(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

// 16 values at p as 4 fp32 vectors.
PK_NEON_INLINE void load16(const float* p, float32x4_t (&v)[4]) {
  v[0] = vld1q_f32(p);
  v[1] = vld1q_f32(p + 4);
  v[2] = vld1q_f32(p + 8);
  v[3] = vld1q_f32(p + 12);
}
PK_NEON_INLINE void load16(const uint16_t* p, float32x4_t (&v)[4]) {
  const uint16x8_t a = vld1q_u16(p), b = vld1q_u16(p + 8);
  v[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16));
  v[1] = vreinterpretq_f32_u32(vshll_high_n_u16(a, 16));
  v[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16));
  v[3] = vreinterpretq_f32_u32(vshll_high_n_u16(b, 16));
}

// 4 floats -> 4 bf16, round to nearest even, NaN kept quiet: bit-identical to float_to_bf16 (scalar.h).
PK_NEON_INLINE uint16x4_t narrow_bf16(float32x4_t x) {
  const uint32x4_t u = vreinterpretq_u32_f32(x);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff)));
  const uint32x4_t ord = vceqq_f32(x, x);  // all ones except on NaN
  return vshrn_n_u32(vbslq_u32(ord, r, vorrq_u32(u, vdupq_n_u32(0x00400000))), 16);
}

// Stores 4 floats at p (bf16: rounded).
PK_NEON_INLINE void store4(float* p, float32x4_t v) { vst1q_f32(p, v); }
PK_NEON_INLINE void store4(uint16_t* p, float32x4_t v) { vst1_u16(p, narrow_bf16(v)); }

// 2^x for 4 lanes: x = n + f, f in [-0.5, 0.5], degree-6 Taylor polynomial of 2^f (truncation error
// (ln2/2)^7/7! = 1.2e-7, ~1 ulp), 2^n added to the exponent field. x < -126 gives exactly 0 (so -inf, a
// masked score, gives 0, and no denormal is made); NaN stays NaN (fmax/fmin return NaN, the compare is
// false, and the NaN's conversion to an integer exponent is 0).
PK_NEON_INLINE float32x4_t exp2_ps(float32x4_t x) {
  const uint32x4_t tiny = vcltq_f32(x, vdupq_n_f32(-126.f));
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-126.f)), vdupq_n_f32(127.f));
  const float32x4_t n = vrndnq_f32(x);
  const float32x4_t f = vsubq_f32(x, n);
  float32x4_t p = vdupq_n_f32(1.5403530393381606e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3333558146428443e-3f), p, f);
  p = vfmaq_f32(vdupq_n_f32(9.6181291076284772e-3f), p, f);
  p = vfmaq_f32(vdupq_n_f32(5.5504108664821580e-2f), p, f);
  p = vfmaq_f32(vdupq_n_f32(2.4022650695910071e-1f), p, f);
  p = vfmaq_f32(vdupq_n_f32(6.9314718055994531e-1f), p, f);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, f);
  const int32x4_t e = vshlq_n_s32(vcvtq_s32_f32(n), 23);
  const uint32x4_t r = vreinterpretq_u32_s32(vaddq_s32(vreinterpretq_s32_f32(p), e));
  return vreinterpretq_f32_u32(vbicq_u32(r, tiny));
}
PK_NEON_INLINE float exp2_s(float x) { return vgetq_lane_f32(exp2_ps(vdupq_n_f32(x)), 0); }

// In-place 4 x 4 transpose: a[i] lane j <- a[j] lane i.
PK_NEON_INLINE void transpose4(float32x4_t (&a)[4]) {
  const float32x4_t t0 = vtrn1q_f32(a[0], a[1]), t1 = vtrn2q_f32(a[0], a[1]);
  const float32x4_t t2 = vtrn1q_f32(a[2], a[3]), t3 = vtrn2q_f32(a[2], a[3]);
  a[0] = vreinterpretq_f32_f64(vzip1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  a[1] = vreinterpretq_f32_f64(vzip1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
  a[2] = vreinterpretq_f32_f64(vzip2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  a[3] = vreinterpretq_f32_f64(vzip2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
}

}  // namespace pk::cpu::neon
