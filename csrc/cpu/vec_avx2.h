// AVX2 + FMA helpers for the AVX2 tier (csrc/cpu/*_avx2.cpp). Those files are compiled with
// -mavx2 -mfma -mno-avx512f (CMakeLists.txt), so nothing here may need AVX-512, and the compiler cannot
// slip an EVEX instruction or ymm16-31 into the tier that an AVX2-only CPU runs.
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace pk::cpu::avx2 {

// 8 bf16 -> 8 floats (exact: a 16-bit shift).
inline __m256 widen_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 8 floats at p, or 8 bf16 widened.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return widen_bf16(p); }

// 8 floats -> 8 bf16, round to nearest even, NaN kept quiet (bit-identical to float_to_bf16).
inline __m128i narrow_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  // pack 32-bit lanes to 16-bit (values < 2^16, so the unsigned saturation never bites)
  const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  return _mm_packus_epi32(lo, hi);
}

// 2^x for 8 lanes: x = n + f, n = round(x) by the 1.5 * 2^23 shifter (its low bits are n, so 2^n is
// n << 23 added to the exponent field), f in [-0.5, 0.5]; 2^f by a degree-5 polynomial fitted for the
// least maximum relative error with 2^0 = 1 exactly: at most 1.8e-7 in fp32 arithmetic, as the degree-6
// Taylor polynomial it replaced (2.4e-7), with one FMA fewer and an add and a sub instead of vroundps and
// vcvtps2dq (2 uops each on Intel cores). x <= -127 gives exactly 0 (so -inf, a masked score, gives 0).
inline __m256 exp2_ps(__m256 x) {
  const __m256 lo = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-126.f), x);
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);
  const __m256 shifter = _mm256_set1_ps(12582912.f);  // 1.5 * 2^23
  const __m256 t = _mm256_add_ps(x, shifter);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, shifter));
  __m256 p = _mm256_set1_ps(1.3264708686619997e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.671509265899658e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550733581185341e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022242426872253e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931470036506653e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_andnot_ps(lo, r);
}

// Sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Lane i = sum of the 8 lanes of a[i] (transposed reduction: 7 hadd + 2 cross-lane ops for 8 sums).
inline __m256 hsum8(const __m256 (&a)[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
// 8 x 8 transpose: lane j of r[i] -> lane i of r[j].
inline void transpose8(__m256 (&r)[8]) {
  __m256 u[8];
  for (int h = 0; h < 8; h += 4) {  // rows h..h+3: column c of the half in lane group c % 4, half c / 4
    const __m256 t0 = _mm256_unpacklo_ps(r[h], r[h + 1]), t1 = _mm256_unpackhi_ps(r[h], r[h + 1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[h + 2], r[h + 3]), t3 = _mm256_unpackhi_ps(r[h + 2], r[h + 3]);
    u[h] = _mm256_shuffle_ps(t0, t2, 0x44);
    u[h + 1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    u[h + 2] = _mm256_shuffle_ps(t1, t3, 0x44);
    u[h + 3] = _mm256_shuffle_ps(t1, t3, 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}
// Max of the 8 lanes.
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The pieces of an online-softmax step (base 2) on a row of scores s[0, n), n a multiple of 8, masked ones
// -inf: row_max gives m' = max(m, s); exp_row turns s into 2^(s - m') in place and returns the lane sums.
inline float row_max(const float* s, int64_t n, float m) {
  __m256 mx = _mm256_set1_ps(m);
  for (int64_t j = 0; j < n; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(s + j));
  return hmax(mx);
}
inline __m256 exp_row(float* s, int64_t n, float mnew) {
  const __m256 vm = _mm256_set1_ps(mnew);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_load_ps(s + j), vm));
    _mm256_store_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  return sum;
}

// One online-softmax step of a row: m' = row_max, s = exp_row; alpha = 2^(m - m') rescales what the row had
// summed; l = l * alpha + sum of the new weights; m = m'. (decode_avx2.cpp per head; attention_avx2.cpp does
// 8 rows at a time with the same pieces.)
inline void online_softmax(float* s, int64_t n, float& m, float& l, float& alpha) {
  const float mnew = row_max(s, n, m);
  const __m256 sum = exp_row(s, n, mnew);
  alpha = _mm256_cvtss_f32(exp2_ps(_mm256_set1_ps(m - mnew)));
  l = l * alpha + hsum(sum);
  m = mnew;
}

}  // namespace pk::cpu::avx2
#endif
