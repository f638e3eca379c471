// AMX bf16 flash attention forward (Sapphire Rapids and later): O = softmax(scale * Q K^T (+ causal
// mask)) V for bf16 Q, K, V, O, both products on AMX tiles, the online softmax on AVX-512, fp32
// accumulation, never materializing the S x S score matrix. fp32 stays on the AVX-512 path
// (attention.cpp): AMX has no fp32 product.
//
// Work item = (batch, kv head, block of query positions), as in attention.cpp: its rows are the
// g = Hq/Hkv query heads sharing the kv head times npos positions, so every K/V tile is fetched once
// for the GQA group. Per item, for each tile of kBk keys and each block of 32 rows:
//   S = Q K^T     AMX, 2 x 2 tiles of 16 x 16 fp32 per 32 x 32 block (the GEMM's blocking,
//                 gemm_amx.cpp): A = Q rows from the item's bf16 copy (16 rows x 32 d), B = K packed
//                 once per call in pair-interleaved form (16 d-pairs x 16 keys: a word transpose of K
//                 rows); stored to an fp32 scratch [32][kBk]
//   softmax       AVX-512, base 2: scores times scale*log2 e, causal / past-the-end keys -> -inf,
//                 running max m and sum l per row; P rounded to bf16 into a scratch [32][kBk] laid out
//                 as A tiles (16 rows x 32 keys); the row's fp32 accumulator is rescaled in place by
//                 alpha = 2^(m_old - m_new) (skipped when alpha == 1, the common case once m settles)
//   O += P V      AMX, 2 x 2 tiles per 32 rows x 32 columns of the fp32 accumulator (loaded from and
//                 stored back to the item's O [rows][D]; rescaling it before the tile load costs one
//                 pass over O, summing a separate P V tile afterwards two); B = V packed once per call
//                 in pair-interleaved form (16 key-pairs x 16 columns), keys past S zero
// At the end O / l is rounded to bf16 (nearest even) into the output rows of the item.
// Under a causal mask the tiles (and the 32-key blocks of a tile) entirely in the future of a row
// block are skipped.
// Built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt); called only when the active tier is
// "amx" (enabled().amx_bf16). Inputs were checked by csrc/bindings.cpp; D up to 256, rounded up to a multiple of 32
// inside (zero columns in the packs and the Q copy; the output rows keep D).
#include "cpu/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/amx_common.h"
#include "cpu/attn_common.h"
#include "cpu/vec.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;

// Keys per K/V tile. 64 keys: two 32-key blocks per S = Q K^T pass and two 32-deep steps per
// O += P V pass over each 32 x 32 accumulator block (each tile load/store of the accumulator feeds
// 8 tdpbf16ps); the packed K and V tiles (16 KB each at D = 128) stay in L1/L2 while the item's row
// blocks pass over them, and one row of scores is 4 zmm.
constexpr int64_t kBk = 64;
constexpr int64_t kNv = kBk / 16;  // zmm per row of scores
// Rows per AMX block: two A tiles of 16 rows.
constexpr int64_t kRb = 32;
// Query rows (GQA heads x positions) per work item: 64 rows amortize the K/V tile fetch 64-fold;
// S = 2048, g = 1 gives 32 blocks per head. Positions per item are a multiple of 32, so that a row
// block belongs to one head and covers consecutive positions (the causal skips need that).
constexpr int64_t kRows = 64;
constexpr int64_t kTileU16 = 512;  // one 16 x 64 B tile, in bf16
static_assert(kBk % 32 == 0, "a key tile is a whole number of 32-key blocks");

// Packed K of one tile: [kBk/16 key groups][D/32 d steps] tiles, element [r][c] = word r of the
// step (d = 32 step + 2r, 2r + 1) of key 16 group + c. K rows hold dr <= D values (a padded head dim: the
// columns from dr to D are packed as zeros, so they add nothing to q.K).
template <int D>
void pack_k(const u16* k, int64_t dr, int64_t nk, u16* dst) {
  for (int64_t kg = 0; kg < kBk / 16; ++kg)
    for (int64_t ds = 0; ds < D / 32; ++ds) {
      const __mmask32 live = vec::mask32(dr - 32 * ds);
      __m512i v[16];
      for (int c = 0; c < 16; ++c) {
        const int64_t j = kg * 16 + c;
        v[c] = j < nk ? _mm512_maskz_loadu_epi16(live, k + j * dr + 32 * ds) : _mm512_setzero_si512();
      }
      amx::transpose16(v);
      u16* t = dst + (kg * (D / 32) + ds) * kTileU16;
      for (int r = 0; r < 16; ++r) _mm512_store_si512(t + r * 32, v[r]);
    }
}

// Packed V of one tile: [kBk/32 key chunks][D/16 column groups] tiles, element [r][c] = the pair
// (V[32 chunk + 2r][16 group + c], V[32 chunk + 2r + 1][16 group + c]), zero past the last key and past
// column dr (V rows of dr <= D values).
template <int D>
void pack_v(const u16* v, int64_t dr, int64_t nk, u16* dst) {
  const __m256i z = _mm256_setzero_si256();
  for (int64_t kc = 0; kc < kBk / 32; ++kc)
    for (int r = 0; r < 16; ++r) {
      const int64_t j = kc * 32 + 2 * r;
      for (int64_t dg = 0; dg < D / 16; ++dg) {
        const __mmask16 live = vec::mask16(dr - 16 * dg);
        const __m256i lo = j < nk ? _mm256_maskz_loadu_epi16(live, v + j * dr + 16 * dg) : z;
        const __m256i hi = j + 1 < nk ? _mm256_maskz_loadu_epi16(live, v + (j + 1) * dr + 16 * dg) : z;
        _mm512_store_si512(dst + ((kc * (D / 16) + dg) * 16 + r) * 32, vec::pair_bf16(lo, hi));
      }
    }
}

struct Ctx {
  const u16* q;
  u16* o;
  const u16* kp;  // [B*Hkv][ntiles][kBk * D] packed K tiles
  const u16* vp;  // [B*Hkv][ntiles][kBk * D] packed V tiles
  int64_t Hq, Hkv, S, g, ntiles, npos;
  int64_t dr;  // the rows' head dim (<= D: the kernel's D is it rounded up to 32, the rest zero)
  float c;     // scale * log2(e)
  bool causal;
  attn::NanSeen* nan;  // notes a NaN in a stored row
};

// Per-thread scratch of one work item.
struct Scratch {
  u16* q;    // [rows][D] bf16 copy of the item's Q rows, zero past the last position
  float* o;  // [rows][D] fp32 accumulators
  float* m;  // [rows] running max (base 2)
  float* l;  // [rows] running sum
  float* s;  // [32][kBk] scores of one row block
  u16* p;    // [32][kBk] bf16 probabilities of one row block
};

// S[32][32 kb ..] = Q[r0 .. r0+31] . K^T for the first nkb 32-key blocks of the tile.
template <int D>
inline void qk_block(const u16* q, const u16* kt, int64_t nkb, float* s) {
  for (int64_t kb = 0; kb < nkb; ++kb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const u16* b = kt + 2 * kb * (D / 32) * kTileU16;
#pragma GCC unroll 4
    for (int ds = 0; ds < D / 32; ++ds) {
      _tile_loadd(4, q + 32 * ds, D * 2);
      _tile_loadd(6, b + ds * kTileU16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b + (D / 32 + ds) * kTileU16, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, q + 16 * D + 32 * ds, D * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* c = s + 32 * kb;
    _tile_stored(0, c, kBk * 4);
    _tile_stored(1, c + 16, kBk * 4);
    _tile_stored(2, c + 16 * kBk, kBk * 4);
    _tile_stored(3, c + 16 * kBk + 16, kBk * 4);
  }
}

// O[r0 .. r0+31][D] += P[32][0 .. 32 nkc) . V (the first nkc 32-key chunks of the tile).
template <int D>
inline void pv_block(const u16* p, const u16* vt, int64_t nkc, float* o) {
  for (int64_t db = 0; db < D / 32; ++db) {
    float* c = o + 32 * db;
    _tile_loadd(0, c, D * 4);
    _tile_loadd(1, c + 16, D * 4);
    _tile_loadd(2, c + 16 * D, D * 4);
    _tile_loadd(3, c + 16 * D + 16, D * 4);
    for (int64_t kc = 0; kc < nkc; ++kc) {
      const u16* b = vt + (kc * (D / 16) + 2 * db) * kTileU16;
      _tile_loadd(4, p + 32 * kc, kBk * 2);
      _tile_loadd(6, b, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b + kTileU16, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, p + 16 * kBk + 32 * kc, kBk * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, D * 4);
    _tile_stored(1, c + 16, D * 4);
    _tile_stored(2, c + 16 * D, D * 4);
    _tile_stored(3, c + 16 * D + 16, D * 4);
  }
}

// Lane i = max of the 16 lanes of a[i]: the transposed reduction of attn::hsum16 with max.
PK_ALWAYS_INLINE __m512 hmax16(const __m512* a) { return attn::reduce16<attn::MaxOp>(a); }

// Online softmax of 16 rows of raw scores s (stride kBk; keys kt0 .. kt0 + kBk - 1), the 16 rows in
// the lanes of m, l: lim[r] = keys of the tile row r sees. Scores are Q'.K with Q' = sign(c) Q, so
// c s = |c| s' and the max of |c| s' is |c| times the max of s'. Updates m, l, writes the bf16
// probabilities p (stride kBk) and rescales the accumulator rows o (stride D) by 2^(m_old - m_new).
// Two passes over the scores (L1-resident): row maxima, then exponentials and row sums; the
// reductions of both are transposed ones over all 16 rows (~3 ops per row each). NV: the vectors of 16
// keys computed (kNv, or 2 when only the first 32-key block was: S <= 32, or a causal diagonal tile);
// lim < 16 NV for every row then, and the keys past NV x 16 are neither read nor written.
template <int D, int NV = kNv>
PK_ALWAYS_INLINE void softmax16(const float* s, const int64_t* lim, float ac, float* m, float* l, u16* p, float* o) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vc = _mm512_set1_ps(ac);
  __m512 acc[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    const float* sr = s + r * kBk;
    if (lim[r] < 16 * NV) {
      acc[r] = _mm512_mask_mov_ps(ninf, vec::mask16(lim[r]), _mm512_load_ps(sr));
#pragma GCC unroll 16
      for (int v = 1; v < NV; ++v)
        acc[r] = _mm512_mask_max_ps(acc[r], vec::mask16(lim[r] - 16 * v), acc[r], _mm512_load_ps(sr + 16 * v));
    } else {
      acc[r] = _mm512_load_ps(sr);
#pragma GCC unroll 16
      for (int v = 1; v < NV; ++v) acc[r] = _mm512_max_ps(acc[r], _mm512_load_ps(sr + 16 * v));
    }
  }
  const __m512 m_old = _mm512_loadu_ps(m);
  // max(NaN-free scaled max, m_old); a row with every key of the tile masked keeps m_old.
  const __m512 m_new = _mm512_max_ps(_mm512_mul_ps(hmax16(acc), vc), m_old);
  // A row with every key masked so far keeps m = -inf; subtracting 0 then keeps p = 0, not NaN.
  const __m512 mu = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
  const __m512 alpha = attn::exp2_ps(_mm512_sub_ps(m_old, mu));
  alignas(64) float mus[16];
  _mm512_store_ps(mus, mu);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    const float* sr = s + r * kBk;
    const __m512 vm = _mm512_set1_ps(mus[r]);
    acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NV; v += 2) {
      __m512 x0 = attn::exp2_neg<3>(_mm512_fmsub_ps(_mm512_load_ps(sr + 16 * v), vc, vm));
      __m512 x1 = attn::exp2_neg<3>(_mm512_fmsub_ps(_mm512_load_ps(sr + 16 * v + 16), vc, vm));
      if (lim[r] < 16 * NV) {
        x0 = _mm512_maskz_mov_ps(vec::mask16(lim[r] - 16 * v), x0);
        x1 = _mm512_maskz_mov_ps(vec::mask16(lim[r] - 16 * v - 16), x1);
      }
      acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(x0, x1));
      _mm512_store_si512(p + r * kBk + 16 * v, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
    }
  }
  _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), alpha, attn::hsum16(acc)));
  _mm512_storeu_ps(m, m_new);
  // Rescale the accumulator rows whose max moved (alpha exactly 1 otherwise: 2^0 is exact).
  alignas(64) float al[16];
  _mm512_store_ps(al, alpha);
  for (unsigned k = _mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_NEQ_UQ); k; k &= k - 1) {
    const int r = __builtin_ctz(k);
    const __m512 va = _mm512_set1_ps(al[r]);
    float* orow = o + r * D;
#pragma GCC unroll 8
    for (int e = 0; e < D / 16; ++e) _mm512_store_ps(orow + 16 * e, _mm512_mul_ps(_mm512_load_ps(orow + 16 * e), va));
  }
}

template <int D>
void item(const Ctx& x, int64_t bkv, int64_t q0, const Scratch& sc) {
  const int64_t S = x.S, g = x.g, np = x.npos, nq = std::min(np, S - q0);
  const int64_t b = bkv / x.Hkv, hkv = bkv % x.Hkv;
  const int64_t dr = x.dr;
  const auto live = [dr](int e) { return vec::mask32(dr - 32 * e); };  // the values of 32-wide step e in a row
  for (int64_t hh = 0; hh < g; ++hh) {
    const u16* src = x.q + ((b * x.Hq + hkv * g + hh) * S + q0) * dr;
    for (int64_t i = 0; i < np; ++i) {
      const int64_t r = hh * np + i;
      // Q' = sign(c) Q (exact in bf16: the sign bit), so that the scores scale by |c| (softmax16); zero past dr.
      const __m512i flip = _mm512_set1_epi16(x.c < 0 ? int16_t(0x8000) : 0);
#pragma GCC unroll 4
      for (int e = 0; e < D / 32; ++e)
        _mm512_store_si512(sc.q + r * D + 32 * e,
                           i < nq ? _mm512_xor_si512(_mm512_maskz_loadu_epi16(live(e), src + i * dr + 32 * e),
                                                     _mm512_maskz_mov_epi16(live(e), flip))
                                  : _mm512_setzero_si512());
      std::memset(sc.o + r * D, 0, D * 4);
      sc.m[r] = -std::numeric_limits<float>::infinity();
      sc.l[r] = 0.f;
    }
  }
  const int64_t kend = x.causal ? q0 + nq : S;
  const int64_t nt = (kend + kBk - 1) / kBk;
  const u16* kp = x.kp + bkv * x.ntiles * kBk * D;
  const u16* vp = x.vp + bkv * x.ntiles * kBk * D;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t kt0 = t * kBk;
    const u16* kt = kp + t * kBk * D;
    const u16* vt = vp + t * kBk * D;
    for (int64_t hh = 0; hh < g; ++hh) {
      for (int64_t i0 = 0; i0 < nq; i0 += kRb) {  // blocks wholly past the last position: nothing to do
        const int64_t r0 = hh * np + i0, pos_hi = q0 + std::min(i0 + kRb, nq) - 1;
        if (x.causal && kt0 > pos_hi) continue;  // every key of the tile is in these rows' future
        // 32-key blocks with a key some row sees (the rest are never computed, and masked).
        const int64_t kvis = std::min(S, x.causal ? pos_hi + 1 : S) - kt0;
        const int64_t nkb = std::min<int64_t>(kBk / 32, (kvis + 31) / 32);
        qk_block<D>(sc.q + r0 * D, kt, nkb, sc.s);
        int64_t lim[kRb];
        for (int64_t r = 0; r < kRb; ++r) {
          // Rows past the last position (padding, never stored) borrow that position.
          const int64_t pos = q0 + std::min(i0 + r, nq - 1);
          lim[r] = (x.causal ? std::min(S, pos + 1) : S) - kt0;
        }
        for (int64_t h = 0; h < kRb; h += 16) {
          if (nkb == 1)
            softmax16<D, 2>(sc.s + h * kBk, lim + h, std::fabs(x.c), sc.m + r0 + h, sc.l + r0 + h, sc.p + h * kBk,
                            sc.o + (r0 + h) * D);
          else
            softmax16<D>(sc.s + h * kBk, lim + h, std::fabs(x.c), sc.m + r0 + h, sc.l + r0 + h, sc.p + h * kBk,
                         sc.o + (r0 + h) * D);
        }
        pv_block<D>(sc.p, vt, nkb, sc.o + r0 * D);
      }
    }
  }
  __mmask16 nan = 0;
  for (int64_t hh = 0; hh < g; ++hh) {
    u16* dst = x.o + ((b * x.Hq + hkv * g + hh) * S + q0) * dr;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t r = hh * np + i;
      const __m512 inv = _mm512_set1_ps(1.f / sc.l[r]);
#pragma GCC unroll 8
      for (int e = 0; e < D / 16; ++e) {  // the columns past dr (zero V columns) are not stored
        const __m512 y = _mm512_mul_ps(_mm512_load_ps(sc.o + r * D + 16 * e), inv);
        nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
        vec::store_bf16(dst + i * dr + 16 * e, y, dr - 16 * e);
      }
    }
  }
  x.nan->note(nan != 0);
}

template <int D>
bool run(const AttentionParams& p) {
  const int64_t Hkv = p.Hkv, S = p.S, g = p.Hq / p.Hkv;
  const int64_t ntiles = (S + kBk - 1) / kBk, nbkv = p.B * Hkv;
  const u16* K = static_cast<const u16*>(p.k);
  const u16* V = static_cast<const u16*>(p.v);
  const size_t pack_bytes = size_t(nbkv * ntiles) * kBk * D * 2;  // packed K, then packed V
  thread_local Keep keep;
  const CallBuffer packs(keep, 2 * pack_bytes);
  u16* const kpack = packs.as<u16>();
  u16* const vpack = kpack + pack_bytes / 2;
  // One thread up to attn::kAttnParallelSteps query-row x padded-key x D steps.
  const bool par = p.B * p.Hq * S * ntiles * kBk * D > attn::kAttnParallelSteps;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t it = 0; it < nbkv * ntiles; ++it) {
    const int64_t bkv = it / ntiles, t = it % ntiles, kt0 = t * kBk, nk = std::min(kBk, S - kt0);
    const int64_t row0 = bkv * S + kt0;  // first row of the tile in k, v
    pack_k<D>(K + row0 * p.D, p.D, nk, kpack + it * kBk * D);
    pack_v<D>(V + row0 * p.D, p.D, nk, vpack + it * kBk * D);
  }

  attn::NanSeen nan;
  Ctx x{static_cast<const u16*>(p.q), static_cast<u16*>(p.o), kpack, vpack, p.Hq, Hkv, S, g,
        ntiles, 0, p.D, p.scale * attn::kLog2e, p.causal, &nan};
  x.npos = std::max<int64_t>(kRb, kRows / g / kRb * kRb);
  const int64_t nqb = (S + x.npos - 1) / x.npos, nitems = nbkv * nqb, rows = g * x.npos;
#pragma omp parallel if (par)
  {
    // Per-thread scratch, kept between calls: Q copy, O, m and l of the item; S and P of a row block.
    thread_local Keep scratch;
    const size_t qo = size_t(rows) * D * 2, oo = size_t(rows) * D * 4, mo = size_t(rows) * 4, so = kRb * kBk * 4;
    char* mem = static_cast<char*>(scratch.get(qo + oo + 2 * mo + so + kRb * kBk * 2));
    const Scratch sc{reinterpret_cast<u16*>(mem), reinterpret_cast<float*>(mem + qo),
                     reinterpret_cast<float*>(mem + qo + oo), reinterpret_cast<float*>(mem + qo + oo + mo),
                     reinterpret_cast<float*>(mem + qo + oo + 2 * mo),
                     reinterpret_cast<u16*>(mem + qo + oo + 2 * mo + so)};
    amx::configure_tiles();
    const attn::FlushDenormals ftz;
    // Items of one kv head are consecutive (the threads share its packed K/V in L2/L3); within a
    // head the heaviest (last, under a causal mask) query block goes first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nitems; ++it) {
      const int64_t bkv = it / nqb, qblk = nqb - 1 - it % nqb;
      item<D>(x, bkv, qblk * x.npos, sc);
    }
    _tile_release();
  }
  return nan.any.load();
}

}  // namespace

// Any D up to 256: the kernel for D rounded up to a whole number of 32-wide tile steps, its rows padded with zeros in
// the packs and the Q copy (cpu.h tier_attention_head_dim).
bool attention_amx(const AttentionParams& p) {
  return attn::with_head_dim<32>(p.D, [&](auto d) { return run<d.value>(p); });
}

}  // namespace pk::cpu
#else  // not x86: no AMX; enabled().amx_bf16 is never true there

#include <stdexcept>

namespace pk::cpu {
bool attention_amx(const AttentionParams&) { throw std::logic_error("attention_amx: AMX exists only on x86-64"); }
}  // namespace pk::cpu
#endif
