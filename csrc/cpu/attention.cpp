// Flash-style attention forward on CPUs: O = softmax(scale * Q K^T (+ causal mask)) V, never
// materializing the S x S score matrix.
//
// Work item = (batch, kv head, block of query positions); its rows are the g = Hq/Hkv query heads
// that share the kv head times the positions, so every K/V tile is fetched once for the GQA group.
// The AVX-512 paths pack a kv head's K (and, in bf16, V) while the items of the head two before it run,
// into a ring of 4 per-head slots that stays in cache (run_avx512).
// Per item, for each 64-key tile and each 4-row micro-block:
//   S  = Q K^T      4 x 64 scores in 16 zmm (keys along lanes), fp32 accumulation
//   online softmax  running max m, running sum l (base 2: Q is pre-scaled by scale*log2 e)
//   O  = alpha O + P V   into fp32 accumulators (the rescale rides on the accumulator load)
// Paths, chosen at run time from CPUID (cpu_features.cpp):
//   fp32 (AVX-512F)       K pre-transposed per tile to [D][64]; V read in place (packed to rows of D where the
//                          head dim is not a multiple of 16, below).
//   bf16 + AMX (tier amx) tiles for both products: attention_amx.cpp.
//   bf16 + AVX512_BF16    vdpbf16ps for both products: K packed to [D/2][64] bf16 pairs, V to
//                          [32][D] row pairs, P rounded to bf16 (as FlashAttention-2 does on GPUs).
//   bf16, AVX-512F only   K, V widened to fp32 in the packing pass, then the fp32 path.
//   NEON (tier neon)      aarch64: blocked NEON flash attention, fp32 (bf16 widened): attention_neon.cpp.
//   AVX2 (tier avx2)      attention_avx2.cpp.
//   portable              the target's vectors through GCC / Clang vector extensions (run_portable: K and V
//                          packed to fp32 per call, R-row x 2-vector micro-kernels for both products); also
//                          every tier's path for a head dim above 256 (any D: rows padded to whole pairs of
//                          vectors in the packs).
// Head dims: the AVX-512 paths (as the AVX2 and NEON ones) run at D rounded up to 16 (1 to 256), the caller's rows
// zero-padded on the way into the packs and the Q copy and cut back in the output stores; D = 16 (2k + 1) ends its
// P.V in a 16-column pass.
// Inputs were checked by csrc/bindings.cpp. All index arithmetic is 64-bit.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/attn_common.h"
#include "cpu/cpu.h"
#include "cpu/scalar.h"
#include "cpu/scratch.h"
#include "cpu/team.h"
#include "cpu/vec.h"
#include "cpu/vec_portable.h"

namespace pk::cpu {
namespace {

using attn::AlignedBuf;
using attn::round_up;

// Keys per K/V tile. 64 keys = 4 zmm of scores per row; an fp32 K tile at D = 128 is 32 KB, the
// V tile another 32 KB: both stay in the 1 MB L2 of a Zen 4 / Sapphire Rapids core while an item's
// micro-blocks sweep over them.
constexpr int64_t kBk = 64;
// Query rows per micro-block: 4 rows x 4 zmm = 16 score accumulators (of 32 zmm registers); per
// head-dim step 4 K loads + 4 broadcasts feed 16 FMAs, so the FMA pipe, not the loads, limits.
constexpr int64_t kMr = 4;
// Query rows (GQA heads x positions) per work item: 64 rows amortize the K/V tile fetch 64-fold,
// and S = 2048, g = 1 gives 32 blocks per head (512 items for 16 heads: fine balance on 2-64 threads).
constexpr int64_t kRows = 64;
// The ring of packed K/V in run_avx512: head h + kAhead is packed while head h's items run, and the last items of
// head h - 1 may still be reading theirs: kAhead + 2 slots of one kv head each.
constexpr int64_t kAhead = 2;
constexpr int64_t kSlots = kAhead + 2;
// Packed bytes per packing job of run_avx512 (a whole number of tiles, at least one).
constexpr int64_t kPackJobBytes = 128 << 10;
static_assert(kBk == 64, "the micro-kernels hold one tile row of scores in 4 zmm");
static_assert(kMr == 4, "the micro-kernels are unrolled for 4 rows");
static_assert(kRows % kMr == 0, "a work item is a whole number of micro-blocks");

// Jobs done for one kv head (run_avx512's packed tiles or finished items), on a cache line of its own.
struct alignas(64) HeadCount {
  std::atomic<int64_t> n{0};
};

struct Ctx {
  const void* q;
  void* o;
  int64_t B, Hq, Hkv, S, g, npos;
  int64_t dr;  // the caller's head dim: the row stride of Q and O (the kernel's D is dr rounded up to 16)
  float c;     // scale * log2(e)
  bool causal;
  attn::NanSeen* nan;  // notes a NaN in a stored row
};

// Per-thread scratch of one work item.
struct Scratch {
  float* q;  // [rows][D] fp32 pre-scaled, or [rows][D] bf16 bits (bf16 path)
  float* o;  // [rows][D] fp32 accumulators
  float* m;  // [rows] running max (base 2)
  float* l;  // [rows] running sum
  float* a;  // [rows] rescale factor of the accumulators for the current tile
  float* p;  // [rows][kBk] probabilities (fp32, or bf16 bits in the first half of each row)
};

// ---- AVX-512 pieces ------------------------------------------------------------------------------
#if defined(__x86_64__)

// Masks the scores of keys outside [0, S) and, if causal, keys after each row's position.
// Only the first NV vectors of 16 keys are live (NV < 4: a short last tile, see item_f32).
template <int NV = 4>
PK_AVX512 PK_ALWAYS_INLINE void mask_scores(__m512 (&s)[kMr][4], int64_t kt0, int64_t S, bool causal,
                                            const int64_t (&pos)[kMr]) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 4
  for (int r = 0; r < kMr; ++r) {
    const int64_t lim = (causal ? std::min(S, pos[r] + 1) : S) - kt0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[r][v] = _mm512_mask_mov_ps(ninf, vec::mask16(lim - 16 * v), s[r][v]);
  }
}

// Online softmax over one 4 x 64 tile of base-2 scores: updates m and l, turns s into
// probabilities, and returns in alpha the factor that rescales the old accumulators. The four rows'
// maxima, sums and rescale factors are computed together, in lanes 4r..4r+3 of one vector each (one
// vector exp2 for the four alphas, no scalar chains): 13% of the S2048 D128 fp32 time before.
// Deg: the degree of attn::exp2_neg's polynomial, 5 for fp32 probabilities, 3 for bf16 ones or outputs.
template <int Deg, int NV = 4>
PK_AVX512 PK_ALWAYS_INLINE void softmax_tile(__m512 (&s)[kMr][4], float* m, float* l, float* alpha) {
  static_assert(kMr == 4, "one 128-bit lane per row");
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i gather = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
  __m512 part[kMr];
#pragma GCC unroll 4
  for (int r = 0; r < kMr; ++r) {
    part[r] = s[r][0];
#pragma GCC unroll 4
    for (int v = 1; v < NV; ++v) part[r] = _mm512_max_ps(part[r], s[r][v]);
  }
  const __m512 m_old = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(m)));
  // max(tile, m_old) with the tile's maximum first: a NaN maximum of the tile is dropped, as std::max
  // would (the NaN scores still make NaN probabilities below).
  const __m512 m_new = _mm512_max_ps(attn::reduce_rows4<attn::MaxOp>(part), m_old);
  // A row with every key masked so far keeps m = -inf; subtracting 0 then keeps p = 0, not NaN.
  const __mmask16 none = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  const __m512 mu = _mm512_mask_mov_ps(m_new, none, _mm512_setzero_ps());
  // The rescale factors by the degree-5 polynomial whatever Deg: exactly 1 when a row's max did not move.
  const __m512 a = attn::exp2_neg<5>(_mm512_sub_ps(m_old, mu));
  // Row r's lane in every lane. Immediates written out: `r * 0x55` is one only once the loop is unrolled, which an
  // -O0 / -O1 build does not do (the file then failed to compile: "the last argument must be an 8-bit immediate").
  const __m512 vm[kMr] = {_mm512_shuffle_f32x4(mu, mu, 0x00), _mm512_shuffle_f32x4(mu, mu, 0x55),
                          _mm512_shuffle_f32x4(mu, mu, 0xAA), _mm512_shuffle_f32x4(mu, mu, 0xFF)};
#pragma GCC unroll 4
  for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[r][v] = attn::exp2_neg<Deg>(_mm512_sub_ps(s[r][v], vm[r]));
    part[r] = s[r][0];
#pragma GCC unroll 4
    for (int v = 1; v < NV; ++v) part[r] = _mm512_add_ps(part[r], s[r][v]);
  }
  const __m512 l_old = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(l)));
  const __m512 l_new = _mm512_fmadd_ps(l_old, a, attn::reduce_rows4<attn::AddOp>(part));
  _mm_storeu_ps(l, _mm512_castps512_ps128(_mm512_permutexvar_ps(gather, l_new)));
  _mm_storeu_ps(m, _mm512_castps512_ps128(_mm512_permutexvar_ps(gather, m_new)));
  _mm_storeu_ps(alpha, _mm512_castps512_ps128(_mm512_permutexvar_ps(gather, a)));
}

// S[4][64] = Q[4][D] . Kt[D][64] (fp32; Q already multiplied by scale*log2 e). NV < 4: only the first
// NV x 16 keys (a short last tile; the others are left unset and never read).
template <int D, int NV = 4>
PK_AVX512 PK_ALWAYS_INLINE void qk_f32(const float* q, const float* kt, __m512 (&s)[kMr][4]) {
  if constexpr (NV < 4) {
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) s[r][v] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int d = 0; d < D; ++d)
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r) {
        const __m512 qb = _mm512_set1_ps(q[r * D + d]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) s[r][v] = _mm512_fmadd_ps(qb, _mm512_load_ps(kt + d * kBk + 16 * v), s[r][v]);
      }
    return;
  }
#pragma GCC unroll 4
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) s[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int d = 0; d < D; ++d) {
    // Named, pinned registers: an array here is kept in memory as well (4 dead stores per step).
    __m512 k0 = _mm512_load_ps(kt + d * kBk), k1 = _mm512_load_ps(kt + d * kBk + 16),
           k2 = _mm512_load_ps(kt + d * kBk + 32), k3 = _mm512_load_ps(kt + d * kBk + 48);
    PK_PIN(k0);
    PK_PIN(k1);
    PK_PIN(k2);
    PK_PIN(k3);
    const __m512 k[4] = {k0, k1, k2, k3};
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * D + d]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) s[r][v] = _mm512_fmadd_ps(qb, k[v], s[r][v]);
    }
  }
}

// The W (1, 2 or 4) vectors of a V row's column pass at r into vv[0, W) (the others repeat the first ones, unused),
// through named, pinned registers (as qk_f32): an array loaded in a loop was also kept on the stack, one dead store
// per V vector and step. fp32 rows (16 floats a vector) or bf16 pair rows (32 u16 a vector: two rows' 16 columns).
PK_AVX512 PK_ALWAYS_INLINE __m512 load_vec(const float* r) { return _mm512_loadu_ps(r); }
PK_AVX512 PK_ALWAYS_INLINE __m512i load_vec(const uint16_t* r) { return _mm512_load_si512(r); }
template <int W, class T, class V>
PK_AVX512 PK_ALWAYS_INLINE void load_pinned(const T* r, V (&vv)[4]) {
  constexpr int kStep = 64 / sizeof(T);
  V v0 = load_vec(r), v1 = v0, v2 = v0, v3 = v0;
  PK_PIN(v0);
  if constexpr (W >= 2) {
    v1 = load_vec(r + kStep);
    v3 = v1;
    PK_PIN(v1);
  }
  if constexpr (W == 4) {
    v2 = load_vec(r + 2 * kStep);
    v3 = load_vec(r + 3 * kStep);
    PK_PIN(v2);
    PK_PIN(v3);
  }
  vv[0] = v0;
  vv[1] = v1;
  vv[2] = v2;
  vv[3] = v3;
}

// The column passes of a P.V over D columns (a multiple of 16): kFull passes of W zmm (16 W columns), then the rest
// of D in a pass of 2 zmm (kRest >= 2) and one of 1 (kRest odd). (Spelled out in each P.V: a helper taking the pass
// as a lambda cannot be inlined into both the AVX-512 and the AVX-512 BF16 functions when the file is built without
// -march=native: target-specific option mismatch.)
template <int D, int W> struct ColumnPasses {
  static_assert(D % 16 == 0 && (W == 1 || W == 2 || W == 4), "whole vectors");
  static constexpr int kFull = D / (16 * W), kRest = D % (16 * W) / 16;
};

// O[R][D] = alpha * O + P[R][0:nj] . V[0:nj][D] (fp32; V rows of stride D), in passes of W zmm of columns (the
// rest of D in passes of 2 and 1, ColumnPasses).
// R = 8, W = 2 (two micro-blocks at once, 16 accumulators): each V line feeds 8 rows instead of 4 (half the
// reads of the V tile, which beside the K tile does not stay in L1d). R = 4, W = 4 for a micro-block alone.
// Sapphire Rapids VM, S2048 D128 fp32, scratch C++ driver alternated: 1 thread H4 64-65 -> 62-63 ms, 2 threads
// H16 132-141 -> 132 ms, causal 71-81 -> 68-71 ms, S512 D64 4.46-4.49 -> 4.30-4.39 ms. (P.V took 48% of
// item_f32's samples against 38% for Q.K^T with the same FMA count; V packed per tile contiguous: no
// further change. R = 12 spilled.)
template <int D, int R, int W>
PK_AVX512 PK_ALWAYS_INLINE void pv_f32(float* o, const float* p, const float* v, int64_t nj, const float* alpha) {
  static_assert(R * W <= 24, "accumulators + V + broadcast fit 32 zmm");
  const auto pass = [&](auto w, int c0) PK_AVX512 __attribute__((always_inline)) {
    constexpr int Wp = decltype(w)::value;
    __m512 acc[R][Wp];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < Wp; ++c) acc[r][c] = _mm512_mul_ps(a, _mm512_load_ps(o + r * D + c0 + 16 * c));
    }
#pragma GCC unroll 2
    for (int64_t j = 0; j < nj; ++j) {
      __m512 vv[4];
      load_pinned<Wp>(v + j * D + c0, vv);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 pb = _mm512_set1_ps(p[r * kBk + j]);
#pragma GCC unroll 4
        for (int c = 0; c < Wp; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < Wp; ++c) _mm512_store_ps(o + r * D + c0 + 16 * c, acc[r][c]);
  };
  using CP = ColumnPasses<D, W>;
#pragma GCC unroll 1
  for (int h = 0; h < CP::kFull; ++h) pass(std::integral_constant<int, W>{}, h * 16 * W);
  if constexpr (CP::kRest >= 2) pass(std::integral_constant<int, 2>{}, CP::kFull * 16 * W);
  if constexpr (CP::kRest % 2 == 1) pass(std::integral_constant<int, 1>{}, D - 16);
}

// S[4][64] = Q[4][D] . K^T with bf16 pairs: q 4 rows of D bf16, kp [D/2][64] pairs; times c.
template <int D, int NV = 4>
PK_AVX512BF16 PK_ALWAYS_INLINE void qk_bf16(const uint32_t* q, const uint32_t* kp, float c, __m512 (&s)[kMr][4]) {
  if constexpr (NV < 4) {  // a short last tile: the first NV vectors of 16 keys only (as qk_f32)
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) s[r][v] = _mm512_setzero_ps();
    }
#pragma GCC unroll 2
    for (int dp = 0; dp < D / 2; ++dp)
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(q[r * (D / 2) + dp]));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          s[r][v] = _mm512_dpbf16_ps(s[r][v], (__m512bh)_mm512_load_si512(kp + dp * kBk + 16 * v), (__m512bh)qb);
      }
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) s[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int dp = 0; dp < D / 2; ++dp) {
      __m512i k0 = _mm512_load_si512(kp + dp * kBk), k1 = _mm512_load_si512(kp + dp * kBk + 16),
              k2 = _mm512_load_si512(kp + dp * kBk + 32), k3 = _mm512_load_si512(kp + dp * kBk + 48);
      PK_PIN(k0);
      PK_PIN(k1);
      PK_PIN(k2);
      PK_PIN(k3);
      const __m512i k[4] = {k0, k1, k2, k3};
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(q[r * (D / 2) + dp]));
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) s[r][v] = _mm512_dpbf16_ps(s[r][v], (__m512bh)k[v], (__m512bh)qb);
      }
    }
  }
  const __m512 vc = _mm512_set1_ps(c);
#pragma GCC unroll 4
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[r][v] = _mm512_mul_ps(s[r][v], vc);
}

// O[4][D] = alpha * O + P[4][0:nj] . V with bf16 pairs: p 4 rows of 64 bf16, vp [32][D][2]; passes of W zmm of
// columns (4: 64 columns; 2 where D is not a multiple of 64), the last 16 columns of D = 16 (2k + 1) in a pass of 1.
template <int D, int W = D % 64 == 0 ? 4 : 2>
PK_AVX512BF16 PK_ALWAYS_INLINE void pv_bf16(float* o, const uint32_t* p, const uint16_t* vp, int64_t nj,
                                            const float* alpha) {
  const int64_t njp = (nj + 1) / 2;
  const auto pass = [&](auto w, int c0) PK_AVX512BF16 __attribute__((always_inline)) {
    constexpr int Wp = decltype(w)::value;
    __m512 acc[kMr][Wp];
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
      for (int c = 0; c < Wp; ++c) acc[r][c] = _mm512_mul_ps(a, _mm512_load_ps(o + r * D + c0 + 16 * c));
    }
#pragma GCC unroll 2
    for (int64_t jp = 0; jp < njp; ++jp) {
      __m512i vv[4];
      load_pinned<Wp>(vp + (jp * D + c0) * 2, vv);
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r) {
        const __m512i pb = _mm512_set1_epi32(static_cast<int>(p[r * (kBk / 2) + jp]));
#pragma GCC unroll 4
        for (int c = 0; c < Wp; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)vv[c], (__m512bh)pb);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < Wp; ++c) _mm512_store_ps(o + r * D + c0 + 16 * c, acc[r][c]);
  };
  using CP = ColumnPasses<D, W>;
#pragma GCC unroll 2
  for (int h = 0; h < CP::kFull; ++h) pass(std::integral_constant<int, W>{}, h * 16 * W);
  if constexpr (CP::kRest >= 2) pass(std::integral_constant<int, 2>{}, CP::kFull * 16 * W);
  if constexpr (CP::kRest % 2 == 1) pass(std::integral_constant<int, 1>{}, D - 16);
}

// The first n values of a row at p (16 fp32, or 16 bf16 bits): a plain load where the vector is whole (n >= 16), a
// masked one (zero past n) at the end of a padded row only.
PK_AVX512 PK_ALWAYS_INLINE __m512 load_part(const float* p, int64_t n) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(vec::mask16(n), p);
}
PK_AVX512 PK_ALWAYS_INLINE __m256i load_part(const uint16_t* p, int64_t n) {
  return n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                 : _mm256_maskz_loadu_epi16(vec::mask16(n), p);
}

// Writes columns [0, dr) of rows [0, nq) of head-row block `ob` (divided by l) to the output rows of stride dr, as T;
// `nan` gains the lanes that hold one.
template <typename T, int D>
PK_AVX512 PK_ALWAYS_INLINE void store_rows(T* dst, int64_t dr, const float* ob, const float* l, int64_t nq,
                                           __mmask16& nan) {
  for (int64_t i = 0; i < nq; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / l[i]);
#pragma GCC unroll 8
    for (int c = 0; c < D / 16; ++c) {
      const __m512 x = _mm512_mul_ps(_mm512_load_ps(ob + i * D + 16 * c), inv);
      T* const to = dst + i * dr + 16 * c;
      if (16 * c + 16 <= dr) {  // a whole vector (every one where dr = D): plain stores
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        if constexpr (std::is_same_v<T, float>)
          _mm512_storeu_ps(to, x);
        else
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), vec::narrow_bf16(x));
      } else {
        const __mmask16 live = vec::mask16(dr - 16 * c);
        nan |= _mm512_mask_cmp_ps_mask(live, x, x, _CMP_UNORD_Q);
        if constexpr (std::is_same_v<T, float>)
          _mm512_mask_storeu_ps(to, live, x);
        else
          _mm256_mask_storeu_epi16(to, live, vec::narrow_bf16(x));
      }
    }
  }
}

// Positions of the rows of a micro-block; rows past the block's last position (padding, never
// stored) borrow that position so that they always have an unmasked key.
inline void row_positions(int64_t q0, int64_t i0, int64_t nq, int64_t (&pos)[kMr]) {
  for (int r = 0; r < kMr; ++r) pos[r] = q0 + std::min<int64_t>(i0 + r, nq - 1);
}

// Phase 1 of a tile at kt0 (item_f32, item_bf16): f(nv, r0, pos) for every micro-block (g heads x nq rows,
// first row r0 in the item's scratch) that sees a key of the tile, with nv = std::integral_constant<int,
// NV>: the vectors of 16 scores the micro-block needs, ceil(nk / 16) for a tile of nk < 64 keys (the last
// one, or the only one when S < 64: at S = 16 the score and softmax work drops 4-fold) and, under a causal
// mask, no vector of keys all after the block's last row (on the diagonal tile 2.5 of 4 on average). Vectors
// past NV are neither computed nor stored.
template <class F>
PK_ALWAYS_INLINE void score_blocks(int64_t g, int64_t np, int64_t nq, int64_t q0, int64_t kt0, int64_t nk,
                                   bool causal, F&& f) {
  const int64_t tile_nv = (nk + 15) / 16;
  for (int64_t hh = 0; hh < g; ++hh)
    for (int64_t i0 = 0; i0 < nq; i0 += kMr) {
      int64_t pos[kMr];
      row_positions(q0, i0, nq, pos);
      if (causal && kt0 > pos[kMr - 1]) continue;  // every key of the tile is in these rows' future
      const int64_t nv = causal ? std::min(tile_nv, (pos[kMr - 1] - kt0) / 16 + 1) : tile_nv;
      const int64_t r0 = hh * np + i0;
      switch (nv) {
        case 1: f(std::integral_constant<int, 1>{}, r0, pos); break;
        case 2: f(std::integral_constant<int, 2>{}, r0, pos); break;
        case 3: f(std::integral_constant<int, 3>{}, r0, pos); break;
        default: f(std::integral_constant<int, 4>{}, r0, pos); break;
      }
    }
}

// One work item on the fp32 path (T = float, or bf16 widened by the packing pass).
// kp: the kv head's packed K, [ntiles][D][kBk] fp32 words; vrows: its V rows, [S][D] fp32 (zero past x.dr).
template <typename T, int D>
PK_AVX512 void item_f32(const Ctx& x, int64_t bkv, int64_t q0, const Scratch& sc, const float* kp, const float* vrows) {
  const int64_t S = x.S, g = x.g, np = x.npos, nq = std::min(np, S - q0), nq4 = round_up(nq, kMr);
  const int64_t b = bkv / x.Hkv, hkv = bkv % x.Hkv;
  const T* Q = static_cast<const T*>(x.q);
  const __m512 vc = _mm512_set1_ps(x.c);
  for (int64_t hh = 0; hh < g; ++hh) {
    const T* src = Q + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr;
    for (int64_t i = 0; i < nq4; ++i) {
      float* dst = sc.q + (hh * np + i) * D;
      for (int c = 0; c < D / 16; ++c) {
        __m512 v = _mm512_setzero_ps();
        if (i < nq) {
          if constexpr (std::is_same_v<T, float>)
            v = load_part(src + i * x.dr + 16 * c, x.dr - 16 * c);
          else
            v = vec::widen_bf16(load_part(reinterpret_cast<const uint16_t*>(src) + i * x.dr + 16 * c, x.dr - 16 * c));
        }
        _mm512_store_ps(dst + 16 * c, _mm512_mul_ps(v, vc));
        _mm512_store_ps(sc.o + (hh * np + i) * D + 16 * c, _mm512_setzero_ps());
      }
      sc.m[hh * np + i] = -std::numeric_limits<float>::infinity();
      sc.l[hh * np + i] = 0.f;
    }
  }
  const int64_t kend = x.causal ? q0 + nq : S;
  const int64_t nt = (kend + kBk - 1) / kBk;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t kt0 = t * kBk, nk = std::min(kBk, S - kt0);
    const float* kt = kp + t * D * kBk;
    const float* vt = vrows + kt0 * D;
    // Phase 1, scores and softmax of every micro-block; phase 2, P.V of every micro-block. Split so
    // that a micro-block's softmax (a latency chain of reductions and the exp polynomial) overlaps
    // the next micro-block's independent Q.K^T FMAs instead of stalling its own P.V (+4% at S=2048).
    // (The lambda carries the target attribute: a lambda does not inherit it.)
    score_blocks(g, np, nq, q0, kt0, nk, x.causal, [&](auto nv, int64_t r0, const int64_t(&pos)[kMr]) PK_AVX512 {
      constexpr int NV = decltype(nv)::value;
      __m512 s[kMr][4];
      qk_f32<D, NV>(sc.q + r0 * D, kt, s);
      if (kt0 + 16 * NV > S || (x.causal && kt0 + 16 * NV - 1 > pos[0])) mask_scores<NV>(s, kt0, S, x.causal, pos);
      softmax_tile<std::is_same_v<T, float> ? 5 : 3, NV>(s, sc.m + r0, sc.l + r0, sc.a + r0);
      // Vectors past NV hold 0: P.V of a pair of micro-blocks reads the first one's P as far as the second's keys.
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          if (v < NV)
            _mm512_store_ps(sc.p + (r0 + r) * kBk + 16 * v, s[r][v]);
          else
            _mm512_store_ps(sc.p + (r0 + r) * kBk + 16 * v, _mm512_setzero_ps());
        }
    });
    // Micro-blocks of a head in pairs where both saw the tile (the first did: the second's rows come later);
    // the first one's P is exactly 0 at the keys only the second sees.
    for (int64_t hh = 0; hh < g; ++hh) {
      for (int64_t i0 = 0; i0 < nq;) {
        const int64_t r0 = hh * np + i0, pair = i0 + kMr < nq ? 2 : 1;
        const int64_t pos_hi = q0 + std::min(i0 + pair * kMr, nq) - 1;
        if (x.causal && kt0 > q0 + std::min(i0 + kMr, nq) - 1) {
          i0 += kMr;
          continue;
        }
        const int64_t nj = x.causal ? std::min(nk, pos_hi - kt0 + 1) : nk;
        if (pair == 2)
          pv_f32<D, 2 * kMr, 2>(sc.o + r0 * D, sc.p + r0 * kBk, vt, nj, sc.a + r0);
        else
          pv_f32<D, kMr, D % 64 == 0 ? 4 : 2>(sc.o + r0 * D, sc.p + r0 * kBk, vt, nj, sc.a + r0);
        i0 += pair * kMr;
      }
    }
  }
  T* O = static_cast<T*>(x.o);
  __mmask16 nan = 0;
  for (int64_t hh = 0; hh < g; ++hh)
    store_rows<T, D>(O + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr, x.dr, sc.o + hh * np * D, sc.l + hh * np, nq,
                     nan);
  x.nan->note(nan != 0);
}

// One work item on the bf16 path (vdpbf16ps). kp: the kv head's packed K, [ntiles][D/2][kBk] bf16 pairs; vp: its
// packed V, [ntiles][kBk/2][D][2].
template <int D>
PK_AVX512BF16 void item_bf16(const Ctx& x, int64_t bkv, int64_t q0, const Scratch& sc, const uint32_t* kp,
                             const uint16_t* vp) {
  const int64_t S = x.S, g = x.g, np = x.npos, nq = std::min(np, S - q0), nq4 = round_up(nq, kMr);
  const int64_t b = bkv / x.Hkv, hkv = bkv % x.Hkv;
  const uint16_t* Q = static_cast<const uint16_t*>(x.q);
  uint16_t* qb = reinterpret_cast<uint16_t*>(sc.q);
  for (int64_t hh = 0; hh < g; ++hh) {
    const uint16_t* src = Q + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr;
    for (int64_t i = 0; i < nq4; ++i) {
      uint16_t* dst = qb + (hh * np + i) * D;
      for (int c = 0; c < D / 16; ++c) {
        const __m256i v = i < nq ? load_part(src + i * x.dr + 16 * c, x.dr - 16 * c) : _mm256_setzero_si256();
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 16 * c), v);
      }
      for (int c = 0; c < D / 16; ++c) _mm512_store_ps(sc.o + (hh * np + i) * D + 16 * c, _mm512_setzero_ps());
      sc.m[hh * np + i] = -std::numeric_limits<float>::infinity();
      sc.l[hh * np + i] = 0.f;
    }
  }
  const int64_t kend = x.causal ? q0 + nq : S;
  const int64_t nt = (kend + kBk - 1) / kBk;
  uint32_t* p32 = reinterpret_cast<uint32_t*>(sc.p);
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t kt0 = t * kBk, nk = std::min(kBk, S - kt0);
    const uint32_t* kt = kp + t * (D / 2) * kBk;
    const uint16_t* vt = vp + t * kBk * D;
    // Two phases, as in item_f32; a short tile computes only its live vectors of scores (S = 16: 37 ->
    // 21 us for 16 heads, D 64, 2 threads, Sapphire Rapids VM with the bf16 dot forced on).
    score_blocks(g, np, nq, q0, kt0, nk, x.causal, [&](auto nv, int64_t r0, const int64_t(&pos)[kMr]) PK_AVX512BF16 {
      constexpr int NV = decltype(nv)::value;
      __m512 s[kMr][4];
      qk_bf16<D, NV>(reinterpret_cast<const uint32_t*>(qb + r0 * D), kt, x.c, s);
      if (kt0 + 16 * NV > S || (x.causal && kt0 + 16 * NV - 1 > pos[0])) mask_scores<NV>(s, kt0, S, x.causal, pos);
      softmax_tile<3, NV>(s, sc.m + r0, sc.l + r0, sc.a + r0);
      // bf16 pairs of keys (2j, 2j + 1); the pairs of dead vectors are zero (P.V never reads them)
      const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int r = 0; r < kMr; ++r) {
        uint32_t* pr = p32 + (r0 + r) * (kBk / 2);
        if constexpr (NV == 1) {
          _mm512_store_si512(pr, (__m512i)_mm512_cvtne2ps_pbh(z, s[r][0]));
        } else {
          _mm512_store_si512(pr, (__m512i)_mm512_cvtne2ps_pbh(s[r][1], s[r][0]));
        }
        if constexpr (NV == 3) _mm512_store_si512(pr + 16, (__m512i)_mm512_cvtne2ps_pbh(z, s[r][2]));
        if constexpr (NV == 4) _mm512_store_si512(pr + 16, (__m512i)_mm512_cvtne2ps_pbh(s[r][3], s[r][2]));
      }
    });
    for (int64_t hh = 0; hh < g; ++hh) {
      for (int64_t i0 = 0; i0 < nq; i0 += kMr) {
        const int64_t r0 = hh * np + i0, pos_hi = q0 + std::min(i0 + kMr, nq) - 1;
        if (x.causal && kt0 > pos_hi) continue;
        const int64_t nj = x.causal ? std::min(nk, pos_hi - kt0 + 1) : nk;
        pv_bf16<D>(sc.o + r0 * D, p32 + r0 * (kBk / 2), vt, nj, sc.a + r0);
      }
    }
  }
  bf16* O = static_cast<bf16*>(x.o);
  __mmask16 nan = 0;
  for (int64_t hh = 0; hh < g; ++hh)
    store_rows<bf16, D>(O + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr, x.dr, sc.o + hh * np * D, sc.l + hh * np, nq,
                        nan);
  x.nan->note(nan != 0);
}

#endif  // __x86_64__

// ---- packing (plain C++: runs once per call, O(S*D) next to the O(S*S*D) products) ---------------

// dst[w][j] = src row j, word w (j < nk), 0 for j in [nk, jend): a 32-bit transpose of one K tile, in
// 16 x 16 blocks of words (nw words per packed row: D or D/2, a multiple of 8); jend is kBk, or for a reader of
// only the live score vectors (qk_f32<D, NV>) nk rounded up to 16. The source rows hold dr values each (fp32, or
// bf16), dr <= D: the words of values past dr are 0. Scalar, it cost ~3 us per head at D = 64, most of a call at
// S = 16 (0.11 ms for 16 heads against 0.02 for torch).
#if defined(__x86_64__)
// The source values of a word: one fp32 (F32), one bf16 widened to fp32 (Widen), a pair of bf16 (Pairs).
enum class KWords { F32, Widen, Pairs };
template <KWords kSrc>
PK_AVX512 void transpose_tile(const void* src, int64_t dr, int64_t nw, int64_t nk, uint32_t* dst, int64_t jend = kBk) {
  for (int64_t j0 = 0; j0 < jend; j0 += 16)
    for (int64_t w0 = 0; w0 < nw; w0 += 16) {
      // the live values of the block's rows: masked loads only at the end of a padded row (load_part)
      const int64_t nv = (kSrc == KWords::Pairs ? dr - 2 * w0 : dr - w0);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t j = j0 + r;
        if (j >= nk) {
          v[r] = _mm512_setzero_si512();
        } else if constexpr (kSrc == KWords::Widen) {
          const uint16_t* row = static_cast<const uint16_t*>(src) + j * dr;
          v[r] = _mm512_castps_si512(vec::widen_bf16(load_part(row + w0, nv)));
        } else if constexpr (kSrc == KWords::Pairs) {
          const uint16_t* row = static_cast<const uint16_t*>(src) + j * dr + 2 * w0;
          v[r] = nv >= 32 ? _mm512_loadu_si512(row) : _mm512_maskz_loadu_epi16(vec::mask32(nv), row);
        } else {
          v[r] = _mm512_castps_si512(load_part(static_cast<const float*>(src) + j * dr + w0, nv));
        }
      }
      vec::transpose16(v);
      // constant indices into v (a loop to a run-time bound could keep v on the stack)
      const int64_t nc = nw - w0;  // 8 where D / 2 is an odd number of 8-word halves, else >= 16
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c)
        if (c < nc) _mm512_store_si512(dst + (w0 + c) * kBk + j0, v[c]);
    }
}

// V rows [nk][dr] (fp32, or bf16 widened) -> [nk][D] fp32, zero past dr.
template <int D, typename T> PK_AVX512 void pad_rows(const T* v, int64_t dr, int64_t nk, float* dst) {
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < D; c += 16) {
      if constexpr (std::is_same_v<T, float>)
        _mm512_store_ps(dst + j * D + c, load_part(v + j * dr + c, dr - c));
      else
        _mm512_store_ps(dst + j * D + c,
                        vec::widen_bf16(load_part(reinterpret_cast<const uint16_t*>(v) + j * dr + c, dr - c)));
    }
}

// V rows [nk][dr] bf16 -> [kBk / 2][D][2]: row pairs interleaved (the vdpbf16ps operand), rows past nk and values
// past dr zero.
template <int D> PK_AVX512 void interleave_v(const uint16_t* v, int64_t dr, int64_t nk, uint16_t* dst) {
  const __m256i z = _mm256_setzero_si256();
  for (int64_t jp = 0; jp < kBk / 2; ++jp)
    for (int64_t c = 0; c < D; c += 16) {
      const uint16_t* r0 = v + 2 * jp * dr + c;
      const __m256i a = 2 * jp < nk ? load_part(r0, dr - c) : z;
      const __m256i b = 2 * jp + 1 < nk ? load_part(r0 + dr, dr - c) : z;
      _mm512_store_si512(dst + (jp * D + c) * 2, vec::pair_bf16(a, b));
    }
}
#endif

template <typename T, int D>
bool run_avx512(const AttentionParams& p, bool dp) {
#if defined(__x86_64__)
  const int64_t B = p.B, Hkv = p.Hkv, S = p.S, g = p.Hq / p.Hkv;
  const int64_t ntiles = (S + kBk - 1) / kBk, nbkv = B * Hkv;
  constexpr bool kIsBf16 = std::is_same_v<T, bf16>;
  // One thread below attn::kAttnParallelSteps = 2^20 query-row x padded-key x D steps (~4 MFLOP, ~57 us on one Zen 4 core). Measured on
  // the loaded 2-core Zen 4 VM (fp32, B1, D64, 2 threads vs 1): S16 H4-H16 took 1.4-1.7x longer, S32 H8-H16
  // broke even (0.96-1.03x faster), S64 H2-H4 was 1.16-1.25x faster, S128 H2 1.8x faster. On the Sapphire
  // Rapids VM S32 H16 (2^20 steps) ran 1.35x faster on 2 threads (42.9 -> 31.7 us; S16 H16, 2^18 steps, 1.13x
  // slower), and S16 with 64 heads (2^20) took the same on 1 and 2 threads: from 2^20 on, the team.
  // Keys counted as the score vectors computed (a short last tile: its live vectors only).
  const int64_t keys = (ntiles - 1) * kBk + round_up(S - (ntiles - 1) * kBk, 16);
  const bool par = p.B * p.Hq * S * keys * D >= attn::kAttnParallelSteps;

  // Packed K (fp32 words: fp32 or widened bf16; or bf16 pairs) and, on the bf16 paths, packed or widened V, per kv
  // head in one of kSlots slots: the packing of head h + kAhead runs beside the items of head h (below), so a head's
  // tiles are written into a buffer that is still in cache when its items read them, instead of one packing pass
  // over all heads first (16 MB of bf16 K and V written and read back at S2048 H16 D128: ~4% of a causal call's
  // samples). The buffer is kept by the calling thread between calls (a fresh 17 MB one at S2048 H16 D128 fp32 was
  // ~4K page faults per call).
  const int64_t kwords = dp ? D / 2 : D;
  // D: the kernel's head dim, the caller's dr rounded up to 16 (the packed rows, the Q copy and the fp32 accumulators
  // are zero past dr). fp32 V is read in place when the rows are whole (dr = D), packed to rows of D otherwise.
  const int64_t dr = p.D;
  const bool v_packed = !dp && (kIsBf16 || dr != D);
  const int64_t slots = std::min<int64_t>(nbkv, kSlots);
  const size_t kslot = static_cast<size_t>(ntiles * kwords * kBk * 4);
  const size_t vslot = static_cast<size_t>(dp ? ntiles * kBk * D * 2 : v_packed ? S * D * 4 : 0);
  thread_local Keep keep;
  const CallBuffer packs(keep, static_cast<size_t>(slots) * (kslot + vslot));
  char* const kbase = packs.as<char>();
  char* const vbase = kbase + slots * kslot;
  const auto kslot_of = [&](int64_t bkv) { return reinterpret_cast<uint32_t*>(kbase + bkv % slots * kslot); };
  const auto vslot_of = [&](int64_t bkv) { return vbase + bkv % slots * vslot; };
  const auto pack_tile = [&](int64_t bkv, int64_t t) PK_AVX512 {
    const int64_t kt0 = t * kBk, nk = std::min(kBk, S - kt0), row0 = bkv * S + kt0;  // first row of the tile
    uint32_t* const kd = kslot_of(bkv) + t * kwords * kBk;
    if (dp) {
      transpose_tile<KWords::Pairs>(static_cast<const uint16_t*>(p.k) + row0 * dr, dr, D / 2, nk, kd);
      interleave_v<D>(static_cast<const uint16_t*>(p.v) + row0 * dr, dr, nk,
                      reinterpret_cast<uint16_t*>(vslot_of(bkv)) + t * kBk * D);
      return;
    }
    if constexpr (kIsBf16)
      transpose_tile<KWords::Widen>(static_cast<const uint16_t*>(p.k) + row0 * dr, dr, D, nk, kd);
    else  // item_f32 reads only the live score vectors of a short tile
      transpose_tile<KWords::F32>(static_cast<const float*>(p.k) + row0 * dr, dr, D, nk, kd, round_up(nk, 16));
    if (v_packed)
      pad_rows<D>(static_cast<const T*>(p.v) + row0 * dr, dr, nk, reinterpret_cast<float*>(vslot_of(bkv)) + kt0 * D);
  };

  attn::NanSeen nan;
  Ctx x{p.q, p.o, B, p.Hq, Hkv, S, g, 0, dr, p.scale * attn::kLog2e, p.causal, &nan};
  x.npos = std::max<int64_t>(kMr, kRows / g / kMr * kMr);
  const int64_t nqb = (S + x.npos - 1) / x.npos;
  const int64_t rows = round_up(g * x.npos, kMr);

  // The jobs, claimed in this order from one ticket: the tiles of heads 0 .. kAhead - 1 (tpj per job); then for each
  // head h, the tiles of head h + kAhead and the items of head h (a query block each; within a head the heaviest,
  // last under a causal mask, first). Items of one kv head are consecutive, so the threads share that head's K/V in
  // L2/L3 (16 heads x 2 MB of packed K/V at S = 2048 fp32 interleaved would overflow a 32 MB L3: -8% on 2 threads).
  // An item waits until its head's tiles are all packed; a tile waits until the items of the head that used its slot
  // before (h - kSlots) are all done. Each job waits only for jobs claimed before it, whose threads are running them:
  // no cycle. With the tiles two heads ahead the waits are rare; a waiter yields its core after a short spin
  // (team::wait_until), which matters when there are more threads than cores (8 threads on the 2-core Zen 5: waits
  // that spun for 200 us cost 23% at S2048 bf16 causal, yielding ones nothing).
  // A packing job takes tpj tiles (~kPackJobBytes of packed K/V): one job per tile cost mid-size calls 2-3%
  // (B1 H16 S128-S256 D64 bf16, 2 threads) against the old static packing loop; with ~128 KB per job they are level.
  const int64_t tpj = std::max<int64_t>(1, kPackJobBytes / static_cast<int64_t>((kslot + vslot) / ntiles));
  const int64_t npj = (ntiles + tpj - 1) / tpj;  // packing jobs per head
  const int64_t pre = std::min(kAhead, nbkv) * npj;  // the packing of the first kAhead heads
  const int64_t group = npj + nqb;                   // the packing of head h + kAhead and the items of head h
  const int64_t nfull = std::max<int64_t>(nbkv - kAhead, 0);  // groups with packing; the last kAhead: items only
  const int64_t njobs = pre + nfull * group + (nbkv - nfull) * nqb;
  std::vector<HeadCount> packed(static_cast<size_t>(nbkv)), done(static_cast<size_t>(nbkv));
  std::atomic<int64_t> ticket{0};
#pragma omp parallel if (par)
  {
    const attn::FlushDenormals ftz;
    AlignedBuf qb(static_cast<size_t>(rows * D * 4)), ob(static_cast<size_t>(rows * D * 4)),
        ml(static_cast<size_t>(3 * rows * 4)), pb(static_cast<size_t>(rows * kBk * 4));
    const Scratch sc{qb.as<float>(), ob.as<float>(), ml.as<float>(), ml.as<float>() + rows, ml.as<float>() + 2 * rows,
                     pb.as<float>()};
    for (int64_t j; (j = ticket.fetch_add(1, std::memory_order_relaxed)) < njobs;) {
      int64_t h, i;  // packing job i of head h (i < npj) or its item i - npj
      if (j < pre) {
        h = j / npj, i = j % npj;
      } else if (j - pre < nfull * group) {
        const int64_t gi = (j - pre) / group, r = (j - pre) % group;
        h = r < npj ? gi + kAhead : gi, i = r;
      } else {
        const int64_t r = j - pre - nfull * group;
        h = nfull + r / nqb, i = npj + r % nqb;
      }
      if (i < npj) {
        if (h >= slots) team::wait_until([&] { return done[h - slots].n.load(std::memory_order_acquire) == nqb; });
        const int64_t t0 = i * tpj, t1 = std::min(ntiles, t0 + tpj);
        for (int64_t t = t0; t < t1; ++t) pack_tile(h, t);
        packed[h].n.fetch_add(t1 - t0, std::memory_order_release);  // counts tiles
      } else {
        team::wait_until([&] { return packed[h].n.load(std::memory_order_acquire) == ntiles; });
        const int64_t q0 = (nqb - 1 - (i - npj)) * x.npos;
        if (dp) {
          if constexpr (kIsBf16)
            item_bf16<D>(x, h, q0, sc, kslot_of(h), reinterpret_cast<const uint16_t*>(vslot_of(h)));
        } else {
          item_f32<T, D>(x, h, q0, sc, reinterpret_cast<const float*>(kslot_of(h)),
                         v_packed ? reinterpret_cast<const float*>(vslot_of(h))
                                  : static_cast<const float*>(p.v) + h * S * D);
        }
        done[h].n.fetch_add(1, std::memory_order_release);
      }
    }
  }
  return nan.any.load();
#else
  (void)p;
  (void)dp;
  return false;
#endif
}

// ---- portable path: plain C++ on the target's vectors (vec_portable.h), no intrinsics ----------------
// Flash attention as two register-blocked products per tile, both shaped like the portable GEMM
// micro-kernel (gemm.cpp: kPr rows x 2 vectors of accumulators, 6 rows, or 14 with AVX-512's 32 registers):
// scores = Q K^T against K packed transposed per tile ([D][kPk] fp32), and O += P V against V rows (fp32,
// padded to whole pairs of vectors); online softmax in base 2 between them (vector exp2, vector row max).
// Work item = (sequence, query head, block of kPq query rows), dynamically scheduled, heaviest first under a
// causal mask.
constexpr int64_t kPq = 64;  // query rows per item
constexpr int kPr = PK_PV_BYTES == 64 ? 14 : 6;  // rows per micro-block: 14 with 32 vector registers (AVX-512)
constexpr int64_t kPk = 64;  // keys per tile
static_assert(kPk % (2 * pv::kLanes) == 0, "a tile is whole pairs of vectors");

struct PortableCtx {
  const AttentionParams* p;
  int64_t g, Dp, nt;
  float c;            // scale * log2(e)
  const float* kt;    // [kv heads from h0][nt][D][kPk]: K transposed per tile, zero from key S to a whole pair of vectors
  const float* vf;    // [kv heads from vh0][vrows][Dp]: V rows (up to S), zero past D; fp32 V with D = Dp: V itself
  int64_t vrows;      // rows per kv head in vf
  attn::NanSeen* nan;  // notes a NaN in a stored row
  int64_t h0 = 0, vh0 = 0;  // the kv heads whose rows kt[0] and vf[0] hold
};

// s[r][0, nkc) = q rows r0.. (scaled) . keys of tile kt (transposed), R rows; nkc: the tile's live keys
// rounded up to a pair of vectors (a short last tile computes only those).
template <int R> void portable_scores(const float* q, int64_t D, const float* kt, int64_t nkc, float* s) {
  constexpr int L = pv::kLanes;
  for (int64_t kc = 0; kc < nkc; kc += 2 * L) {
    pv::vf acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = pv::vf{};
    for (int64_t d = 0; d < D; ++d) {
      const pv::vf b0 = pv::load(kt + d * kPk + kc), b1 = pv::load(kt + d * kPk + kc + L);
      for (int r = 0; r < R; ++r) {
        const float a = q[r * D + d];
        acc[r][0] += b0 * a;
        acc[r][1] += b1 * a;
      }
    }
    for (int r = 0; r < R; ++r) {
      pv::store(s + r * kPk + kc, acc[r][0]);
      pv::store(s + r * kPk + kc + L, acc[r][1]);
    }
  }
}

// o[r][0, Dp) += sum over j < nj of p[r][j] * v[j], R rows.
template <int R> void portable_pv(const float* pr, const float* v, int64_t nj, int64_t Dp, float* o) {
  constexpr int L = pv::kLanes;
  for (int64_t c = 0; c < Dp; c += 2 * L) {
    pv::vf acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = pv::load(o + r * Dp + c);
      acc[r][1] = pv::load(o + r * Dp + c + L);
    }
    for (int64_t j = 0; j < nj; ++j) {
      const pv::vf b0 = pv::load(v + j * Dp + c), b1 = pv::load(v + j * Dp + c + L);
      for (int r = 0; r < R; ++r) {
        const float a = pr[r * kPk + j];
        acc[r][0] += b0 * a;
        acc[r][1] += b1 * a;
      }
    }
    for (int r = 0; r < R; ++r) {
      pv::store(o + r * Dp + c, acc[r][0]);
      pv::store(o + r * Dp + c + L, acc[r][1]);
    }
  }
}

// One micro-block of R rows (first query position pos0) against tile t: scores, mask, online softmax, P.V.
template <int R>
void portable_block(const PortableCtx& x, int64_t bkv, int64_t t, int64_t pos0, const float* q, float* o, float* m,
                    float* l, float* s) {
  const AttentionParams& p = *x.p;
  const int64_t S = p.S, D = p.D, kt0 = t * kPk, nk = std::min(kPk, S - kt0), nkc = round_up(nk, 2 * pv::kLanes);
  portable_scores<R>(q, D, x.kt + ((bkv - x.h0) * x.nt + t) * D * kPk, nkc, s);
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t nj = nk;  // keys any row of the block sees
  if (p.causal) nj = std::min(nk, pos0 + R - 1 - kt0 + 1);
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * kPk;
    const int64_t lim = p.causal ? std::clamp<int64_t>(pos0 + r - kt0 + 1, 0, nk) : nk;  // keys of row r: [0, lim)
    for (int64_t j = lim; j < nkc; ++j) sr[j] = ninf;
    pv::softmax_step(sr, nkc, m[r], l[r], o + r * x.Dp, x.Dp);
  }
  portable_pv<R>(s, x.vf + ((bkv - x.vh0) * x.vrows + kt0) * x.Dp, nj, x.Dp, o);
}

// portable_block<R> for a run-time R in 1..N.
template <int N>
void portable_rows(int64_t R, const PortableCtx& x, int64_t bkv, int64_t t, int64_t pos0, const float* q, float* o,
                   float* m, float* l, float* s) {
  if constexpr (N > 1)
    if (R < N) return portable_rows<N - 1>(R, x, bkv, t, pos0, q, o, m, l, s);
  portable_block<N>(x, bkv, t, pos0, q, o, m, l, s);
}

template <typename T>
void portable_item(const PortableCtx& x, int64_t bh, int64_t q0, float* sc) {
  const AttentionParams& p = *x.p;
  const int64_t S = p.S, D = p.D, Dp = x.Dp, nq = std::min(kPq, S - q0);
  const int64_t bkv = bh / p.Hq * p.Hkv + bh % p.Hq / x.g;
  float *q = sc, *o = q + kPq * D, *m = o + kPq * Dp, *l = m + kPq, *s = l + kPq;  // s: [kPr][kPk]
  const T* Q = static_cast<const T*>(p.q) + (bh * S + q0) * D;
  for (int64_t i = 0; i < nq * D; ++i) q[i] = load_f(Q, i) * x.c;
  std::fill(o, o + nq * Dp, 0.f);
  std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.f);
  const int64_t kend = p.causal ? q0 + nq : S;
  for (int64_t t = 0; t * kPk < kend; ++t)
    for (int64_t r0 = 0; r0 < nq; r0 += kPr) {
      const int64_t R = std::min<int64_t>(kPr, nq - r0);
      if (p.causal && t * kPk > q0 + r0 + R - 1) continue;  // every key of the tile is in these rows' future
      float *qr = q + r0 * D, *orr = o + r0 * Dp, *mr = m + r0, *lr = l + r0;
      portable_rows<kPr>(R, x, bkv, t, q0 + r0, qr, orr, mr, lr, s);
    }
  T* O = static_cast<T*>(p.o) + (bh * S + q0) * D;
  bool nan = false;
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const float y = o[r * Dp + d] / l[r];
      nan |= y != y;
      store_f(O, r * D + d, y);
    }
  x.nan->note(nan);
}

// Tile kt0 of kv head bkv: K transposed into kd ([D][kPk], zero from the tile's last key to a whole pair of vectors),
// V (unless vd is null) into vd ([kPk][Dp], zero past D).
template <typename T>
void pack_portable_tile(const AttentionParams& p, int64_t bkv, int64_t kt0, float* kd, float* vd, int64_t Dp) {
  const int64_t S = p.S, D = p.D, nk = std::min(kPk, S - kt0);
  const T* ks = static_cast<const T*>(p.k) + (bkv * S + kt0) * D;
  const T* vs = static_cast<const T*>(p.v) + (bkv * S + kt0) * D;
  const int64_t nkc = round_up(nk, 2 * pv::kLanes);  // the columns portable_scores reads
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t d = 0; d < D; ++d) kd[d * kPk + j] = load_f(ks, j * D + d);
  if (nk < nkc)
    for (int64_t d = 0; d < D; ++d) std::fill(kd + d * kPk + nk, kd + d * kPk + nkc, 0.f);
  for (int64_t j = 0; j < nk && vd != nullptr; ++j) {  // P.V reads rows j < nk only
    for (int64_t d = 0; d < D; ++d) vd[j * Dp + d] = load_f(vs, j * D + d);
    std::fill(vd + j * Dp + D, vd + (j + 1) * Dp, 0.f);
  }
}

template <typename T>
bool run_portable(const AttentionParams& p) {
  const int64_t S = p.S, D = p.D, nbkv = p.B * p.Hkv, nt = (S + kPk - 1) / kPk;
  const int64_t Dp = round_up(D, 2 * pv::kLanes), nqb = (S + kPq - 1) / kPq;
  // Short fp32 calls read V rows where they are (S16 D64 H16, 2 threads: 20.5 -> 18.8 us); long ones read a packed
  // copy (S2048 D128 H16: 96-97 ms against 99 in place, alternated twice).
  const bool v_in_place = std::is_same_v<T, float> && D == Dp && S <= 256;
  // The kv heads are packed (K transposed, V) and run a chunk of `chunk` heads at a time (attn::heads_per_pack).
  const int64_t head_floats = nt * kPk * (D + (v_in_place ? 0 : Dp)), g = p.Hq / p.Hkv;
  const int64_t chunk = attn::heads_per_pack(head_floats * 4, nbkv);
  thread_local Keep keep;
  const CallBuffer packs(keep, static_cast<size_t>(chunk * head_floats * 4));
  float* const kt = packs.as<float>();
  float* const vf = v_in_place ? nullptr : kt + chunk * nt * kPk * D;
  attn::NanSeen nan;
  const PortableCtx x0{&p, g, Dp, nt, p.scale * attn::kLog2e, kt,
                       v_in_place ? static_cast<const float*>(p.v) : vf, v_in_place ? S : nt * kPk, &nan};
  const bool par = p.B * p.Hq * S * S * D >= attn::kAttnParallelSteps;
#pragma omp parallel if (par)
  {
    AlignedBuf sc(static_cast<size_t>((kPq * D + kPq * Dp + 2 * kPq + kPr * kPk) * 4));
    for (int64_t h0 = 0; h0 < nbkv; h0 += chunk) {
      const int64_t h1 = std::min(nbkv, h0 + chunk);
      PortableCtx x = x0;
      x.h0 = h0;
      x.vh0 = v_in_place ? 0 : h0;
#pragma omp for schedule(static)
      for (int64_t u = h0 * nt; u < h1 * nt; ++u)  // (implicit barrier) pack K (transposed) and V of one tile
        pack_portable_tile<T>(p, u / nt, u % nt * kPk, kt + (u - h0 * nt) * D * kPk,
                              v_in_place ? nullptr : vf + (u - h0 * nt) * kPk * Dp, Dp);
      // The chunk's query heads (kv head u has heads u g .. u g + g - 1) by query block, the last (heaviest if causal)
      // first; the implicit barrier keeps the next chunk's packing off these packs until every item is done.
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < (h1 - h0) * g * nqb; ++i)
        portable_item<T>(x, h0 * g + i / nqb, (nqb - 1 - i % nqb) * kPq, sc.as<float>());
    }
  }
  return nan.any.load();
}

template <typename T>
bool dispatch(const AttentionParams& p) {
  if (attention_isa(p.D, p.dtype) == Isa::portable) return run_portable<T>(p);  // cpu.h tier_attention_head_dim
  const Features f = enabled();  // the active ISA tier (cpu.h)
  if (!f.avx512f && f.avx2_fma) return attention_avx2(p);
#if defined(__aarch64__)  // attention_neon.cpp is empty elsewhere
  if (f.neon) return attention_neon(p);
#endif
  if (!f.avx512f) return run_portable<T>(p);
  if constexpr (std::is_same_v<T, bf16>)
    if (f.amx_bf16) return attention_amx(p);  // AMX tiles for both products (attention_amx.cpp), any D <= 256
  // any D <= 256, run at D rounded up to 16 (run_avx512)
  const bool dp = std::is_same_v<T, bf16> && use_bf16_dot();
  return attn::with_head_dim<16>(p.D, [&](auto d) { return run_avx512<T, d.value>(p, dp); });
}

// A causal call whose kernel stored a NaN (attn::NanSeen): a row whose output holds a NaN in a column where its kv
// head's V is finite up to the row's position (so the NaN came from a later V row, carried in by the diagonal tile's
// P.V as 0 * inf or 0 * NaN) is computed again from its own keys only, one row at a time in fp32. Rows whose NaN
// columns see a non-finite V value at or before their position keep the kernel's result, non-finite in those
// columns either way (so a tail of NaN padding costs nothing here); a NaN from a row's own q or K comes out again.
// Only then does a row's output depend on nothing but the V rows up to its own position, as in the float64 reference
// (pykernels.kernels.attention).
template <typename T>
void exact_causal_rows(const AttentionParams& p) {
  const int64_t S = p.S, D = p.D, g = p.Hq / p.Hkv, nbkv = p.B * p.Hkv;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.o);
  // per kv head: the first V row with a non-finite value in each column (S if none), and the last such row of any column
  std::vector<int64_t> first(static_cast<size_t>(nbkv * D), S), last(static_cast<size_t>(nbkv), -1);
  const float big = std::numeric_limits<float>::max();
  const bool par = nbkv * S * D >= attn::kAttnParallelSteps / 64 && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t u = 0; u < nbkv; ++u)
    for (int64_t j = 0; j < S; ++j) {
      const T* vr = V + (u * S + j) * D;
      int bad = 0;  // a branch-free test of the row first (vectorized); most rows are finite
      for (int64_t d = 0; d < D; ++d) bad |= !(std::fabs(load_f(vr, d)) <= big);
      if (!bad) continue;
      last[u] = j;
      for (int64_t d = 0; d < D; ++d)
        if (!std::isfinite(load_f(vr, d))) first[u * D + d] = std::min(first[u * D + d], j);
    }
#pragma omp parallel for schedule(dynamic, 1) if (par)
  for (int64_t bh = 0; bh < p.B * p.Hq; ++bh) {
    const int64_t u = bh / p.Hq * p.Hkv + bh % p.Hq / g;
    std::vector<float> s(static_cast<size_t>(S)), o(static_cast<size_t>(D));
    for (int64_t r = 0; r < last[u]; ++r) {
      T* out = O + (bh * S + r) * D;
      int nan = 0;
      for (int64_t d = 0; d < D; ++d) nan |= std::isnan(load_f(out, d));
      if (!nan) continue;
      bool carried = false;
      for (int64_t d = 0; d < D && !carried; ++d) carried = std::isnan(load_f(out, d)) && first[u * D + d] > r;
      if (!carried) continue;
      const T* q = Q + (bh * S + r) * D;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j <= r; ++j) {
        const T* k = K + (u * S + j) * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += load_f(q, d) * load_f(k, d);
        s[j] = acc * p.scale;
        mx = std::max(mx, s[j]);  // a NaN score is skipped here and makes l NaN below
      }
      std::fill(o.begin(), o.end(), 0.f);
      float l = 0.f;
      for (int64_t j = 0; j <= r; ++j) {
        const float w = std::exp(s[j] - mx);
        const T* v = V + (u * S + j) * D;
        l += w;
        float* od = o.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) od[d] += w * load_f(v, d);
      }
      for (int64_t d = 0; d < D; ++d) store_f(out, d, o[d] / l);
    }
  }
}

}  // namespace

void attention(const AttentionParams& p) {
  if (p.dtype == DType::f32) {
    if (dispatch<float>(p) && p.causal) exact_causal_rows<float>(p);
  } else if (p.dtype == DType::bf16) {
    if (dispatch<bf16>(p) && p.causal) exact_causal_rows<bf16>(p);
  } else {
    throw std::invalid_argument(std::string("native cpu attention does not support dtype ") + dtype_name(p.dtype));
  }
}

}  // namespace pk::cpu
