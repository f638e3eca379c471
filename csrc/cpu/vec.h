// Small AVX-512 helpers for the CPU kernels: tail masks, bf16 <-> fp32 in registers, transposes and transposed
// reductions.
// Every function carries its own target attribute, so this header is safe in a file built without
// -mavx512f; call the helpers only from functions with the same (or a wider) target attribute, and
// only after checking pk::cpu::features().avx512f at run time.
#pragma once
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

// GCC 12's AVX-512 headers build _mm512_undefined_*() from a self-initialized variable, which trips
// -W(maybe-)uninitialized in shift/convert intrinsics once inlined: false positives.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define PK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define PK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace pk::cpu::vec {

// The first min(max(n, 0), 16) lanes.
PK_AVX512 inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
// The first min(max(n, 0), 32) lanes.
PK_AVX512 inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// fp32 -> bf16 bits rounded to nearest even, NaN kept quiet (bit-identical to float_to_bf16 in
// scalar.h); the bf16 is in the HIGH 16 bits of each 32-bit lane.
PK_AVX512 inline __m512i bf16_rne_hi(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
}
// 16 floats -> 16 bf16 (round to nearest even).
PK_AVX512 inline __m256i narrow_bf16(__m512 x) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rne_hi(x), 16));
}
// 16 bf16 -> 16 floats (exact).
PK_AVX512 inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 columns of two bf16 rows -> 16 words (lo[c], hi[c]), lo in the low half: the pair-interleaved
// ("VNNI") order vdpbf16ps and tdpbf16ps read their second operand in.
PK_AVX512 inline __m512i pair_bf16(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}
// n (<= 16, the rest zero) bf16 at p -> floats; never reads past p[n-1].
PK_AVX512 inline __m512 load_bf16(const uint16_t* p, int64_t n) {
  return widen_bf16(_mm256_maskz_loadu_epi16(mask16(n), p));
}
// Stores the first n (<= 16) lanes of x to p as bf16; never writes past p[n-1].
PK_AVX512 inline void store_bf16(uint16_t* p, __m512 x, int64_t n) {
  _mm256_mask_storeu_epi16(p, mask16(n), narrow_bf16(x));
}

// 16 x 16 transpose of 32-bit words, in place: afterwards lane c of v[r] is what lane r of v[c] was.
PK_AVX512 inline void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3; b[4g + j] holds column j + 4L in 128-bit lane L
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), d = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i e = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), f = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    v[j] = _mm512_shuffle_i32x4(c, e, 0x88);
    v[j + 8] = _mm512_shuffle_i32x4(c, e, 0xDD);
    v[j + 4] = _mm512_shuffle_i32x4(d, f, 0x88);
    v[j + 12] = _mm512_shuffle_i32x4(d, f, 0xDD);
  }
}

// Returns the vector whose lane i is the sum of the 16 lanes of a[i] (a transposed reduction:
// 15 combine steps of 2 permutes + 1 add, i.e. ~3 ops per sum instead of ~8 for a separate
// horizontal reduction per vector).
// Lane tables of the combine step: x holds m vectors with c = 16/m partial sums each (lane v*c + k),
// y the next m; the result holds 2m vectors with c/2 partial sums each.
struct HsumPerm { int32_t a[16], b[16]; };
constexpr HsumPerm make_hsum_perm(int m) {
  HsumPerm p{};
  const int c = 16 / m, h = c / 2;
  for (int L = 0; L < 16; ++L) {
    const int v = L / h, k = L % h;
    const int src = v < m ? v * c + k : 16 + (v - m) * c + k;
    p.a[L] = src;
    p.b[L] = src + h;
  }
  return p;
}
alignas(64) inline constexpr HsumPerm kHsumPerm[4] = {make_hsum_perm(1), make_hsum_perm(2), make_hsum_perm(4),
                                                      make_hsum_perm(8)};
struct AddOp {
  PK_AVX512 inline __attribute__((always_inline)) __m512 operator()(__m512 x, __m512 y) const {
    return _mm512_add_ps(x, y);
  }
};
struct MaxOp {
  PK_AVX512 inline __attribute__((always_inline)) __m512 operator()(__m512 x, __m512 y) const {
    return _mm512_max_ps(x, y);
  }
};
template <class Op, int I>
PK_AVX512 inline __attribute__((always_inline)) __m512 combine_(__m512 x, __m512 y) {
  return Op{}(_mm512_permutex2var_ps(x, _mm512_load_si512(kHsumPerm[I].a), y),
              _mm512_permutex2var_ps(x, _mm512_load_si512(kHsumPerm[I].b), y));
}
// The transposed reduction with any associative Op (AddOp: sums, MaxOp: maxima).
template <class Op>
PK_AVX512 inline __attribute__((always_inline)) __m512 reduce16(const __m512* a) {
  __m512 l1[8], l2[4], l3[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) l1[i] = combine_<Op, 0>(a[2 * i], a[2 * i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) l2[i] = combine_<Op, 1>(l1[2 * i], l1[2 * i + 1]);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) l3[i] = combine_<Op, 2>(l2[2 * i], l2[2 * i + 1]);
  return combine_<Op, 3>(l3[0], l3[1]);
}
PK_AVX512 inline __attribute__((always_inline)) __m512 hsum16(const __m512* a) { return reduce16<AddOp>(a); }
// The first two combine steps of reduce16 for 4 vectors, then the 4 partials of each row within its
// 128-bit lane: lanes 4r..4r+3 of the result all hold Op over the 16 lanes of a[r] (attention.cpp's 4-row
// softmax).
template <class Op>
PK_AVX512 inline __attribute__((always_inline)) __m512 reduce_rows4(const __m512* a) {
  __m512 z = combine_<Op, 1>(combine_<Op, 0>(a[0], a[1]), combine_<Op, 0>(a[2], a[3]));
  z = Op{}(z, _mm512_permute_ps(z, _MM_SHUFFLE(2, 3, 0, 1)));
  return Op{}(z, _mm512_permute_ps(z, _MM_SHUFFLE(1, 0, 3, 2)));
}

}  // namespace pk::cpu::vec
#endif
