// Flash-style attention forward, AVX2 + FMA tier (see cpu.h and attention.cpp for the problem).
// Built with -mavx2 -mfma -mno-avx512f.
//
// Once per call (in parallel): K packed into transposed tiles of kBk = 64 keys, [D][64] fp32 (bf16
// widened), and bf16 V widened to fp32. Then work items = (batch, query head, block of kQb = 96
// positions); under a causal mask the heaviest (last) blocks go first. Per item, for each tile of keys:
//   S = Q K^T       6 rows x 16 keys = 12 ymm accumulators over D (the GEMM micro-kernel's shape: a
//                   broadcast of q, two rows of the transposed tile)
//   online softmax  base 2 (Q pre-scaled by scale * log2 e), fp32
//   O = a O + P V   6 rows x 16 columns = 12 ymm accumulators, fp32
// Accumulation is fp32 throughout. Inputs were checked by csrc/bindings.cpp. Head dims 1 to 256 (cpu.h
// tier_attention_head_dim): the kernels run at D, the caller's dr rounded up to 16, on rows zero-padded past dr in the
// K / V packs and the Q copy (fp32 V is packed then, read in place otherwise), cut back in the output stores.
#include "cpu/cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/attn_common.h"
#include "cpu/scalar.h"
#include "cpu/scratch.h"
#include "cpu/vec_avx2.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using attn::AlignedBuf;

// Keys per tile: 64 x 128 fp32 = 32 KB of K, then of V, in the 48 KB L1d of the CPU it was measured on.
// Sapphire Rapids VM, avx2 tier, 1 thread, S2048 D128 H4 (scratch C++ driver, three alternations): tiles of
// 32 / 64 / 128 / 256 keys 98-105 / 92-98 / 99-106 / 104-109 ms (per tile: the O round trip of P V, the
// rescale and the row reductions; above 64 the tile leaves L1d).
constexpr int64_t kBk = 64;
// Query positions per item: each K/V tile (from L2) feeds 96 rows. S2048 D128 H16, 2 threads, alternated 5
// times: 48 rows 183-200 ms, 96 rows 174-192 (causal the same, 1 thread the same, D64 S64 / S128 0.12 / 0.46 ->
// 0.11 / 0.43 ms); 24 rows 194-200.
constexpr int64_t kQb = 96;
static_assert(kBk % 16 == 0 && kQb % 6 == 0 && kQb % 8 == 0, "16-key score blocks, 6-row blocks, 8-row softmax");

struct Scratch {
  float *q, *o, *s, *m, *l, *alpha;
};

// The first n (< 8) values at p as 8 floats, the rest 0 (none for n <= 0); all 8 for n >= 8. The row ends of a
// padded head dim: a copy, so nothing past the row is read.
template <class T> inline __m256 load8_part(const T* p, int64_t n) {
  if (n >= 8) return avx2::load8(p);
  alignas(32) T tmp[8] = {};
  if (n > 0) std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(T));
  return avx2::load8(tmp);
}

// K rows [nj][dr] (nj <= kBk) -> dst [D][kBk], keys past nj up to the 16-key block that holds them zero
// (the score blocks the item computes; the rest of a short last tile is never read), and the rows d >= dr: 8 x 8
// blocks transposed in registers.
template <class T, int D> void pack_k(const T* k, int64_t dr, int64_t nj, float* dst) {
  for (int64_t j0 = 0; j0 < (nj + 15) / 16 * 16; j0 += 8)
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int u = 0; u < 8; ++u)
        r[u] = j0 + u < nj ? load8_part(k + (j0 + u) * dr + d0, dr - d0) : _mm256_setzero_ps();
      avx2::transpose8(r);
      for (int c = 0; c < 8; ++c) _mm256_store_ps(dst + (d0 + c) * kBk + j0, r[c]);
    }
}

// s[r][0..16) = q[r] . kt[.][0..16) for 6 rows of q (row stride D) and 16 keys of a transposed tile.
template <int D> inline void scores_6x16(const float* q, const float* kt, float* s) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_load_ps(kt + d * kBk), k1 = _mm256_load_ps(kt + d * kBk + 8);
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      const __m256 w = _mm256_broadcast_ss(q + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(w, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    _mm256_store_ps(s + r * kBk, acc[r][0]);
    _mm256_store_ps(s + r * kBk + 8, acc[r][1]);
  }
}

// One online-softmax step (base 2) of 8 rows of scores (row stride kBk), over their first n (a multiple of
// 8; masked ones -inf), with avx2::online_softmax's pieces per row, but the rows' rescale factors come
// from one exp2 and their sums from one transposed reduction. Rows past the item's (pad rows, up to a
// multiple of 8 <= kQb) compute on scores left from earlier tiles or zeros (the buffer starts zeroed);
// nobody reads them.
inline void softmax_rows8(float* s, int64_t n, float* m, float* l, float* alpha) {
  alignas(32) float mn[8];
  __m256 sum[8];
  for (int r = 0; r < 8; ++r) {
    mn[r] = avx2::row_max(s + r * kBk, n, m[r]);
    sum[r] = avx2::exp_row(s + r * kBk, n, mn[r]);
  }
  const __m256 mnew = _mm256_load_ps(mn);
  const __m256 a = avx2::exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(m), mnew));
  _mm256_storeu_ps(alpha, a);
  _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), a, avx2::hsum8(sum)));
  _mm256_storeu_ps(m, mnew);
}

// o[r][c0..c0+16) = alpha[r] o[r] + sum_j p[r][j] v[j][c0..), R rows.
template <int R, int D> inline void pv_block(float* o, const float* p, const float* alpha, const float* v, int64_t nj, int c0) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
    acc[r][0] = _mm256_mul_ps(a, _mm256_load_ps(o + r * D + c0));
    acc[r][1] = _mm256_mul_ps(a, _mm256_load_ps(o + r * D + c0 + 8));
  }
  for (int64_t j = 0; j < nj; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * D + c0), v1 = _mm256_loadu_ps(v + j * D + c0 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * kBk + j);
      acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(o + r * D + c0, acc[r][0]);
    _mm256_store_ps(o + r * D + c0 + 8, acc[r][1]);
  }
}

template <int D> void pv_rows(int R, float* o, const float* p, const float* alpha, const float* v, int64_t nj) {
  for (int c0 = 0; c0 < D; c0 += 16) {
    switch (R) {
      case 1: pv_block<1, D>(o, p, alpha, v, nj, c0); break;
      case 2: pv_block<2, D>(o, p, alpha, v, nj, c0); break;
      case 3: pv_block<3, D>(o, p, alpha, v, nj, c0); break;
      case 4: pv_block<4, D>(o, p, alpha, v, nj, c0); break;
      case 5: pv_block<5, D>(o, p, alpha, v, nj, c0); break;
      default: pv_block<6, D>(o, p, alpha, v, nj, c0); break;
    }
  }
}

// kp: the packed K tiles of this kv head ([tile][D][kBk]); V: its rows [S][D], fp32 (bf16 widened).
template <class T, int D>
void item(const AttentionParams& p, int64_t bh, int64_t q0, const float* kp, const float* V, const Scratch& sc,
          attn::NanSeen& seen) {
  const int64_t S = p.S;
  const int64_t nq = std::min(kQb, S - q0), nr = (nq + 5) / 6 * 6;  // rows, rounded up to 6-row blocks
  const float c = p.scale * attn::kLog2e, ninf = -std::numeric_limits<float>::infinity();
  const int64_t dr = p.D;  // the caller's head dim, the row stride of Q and O
  const T* Q = static_cast<const T*>(p.q) + (bh * S + q0) * dr;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t rr = std::min(r, nq - 1);  // the pad rows repeat the last one
    for (int d = 0; d < D; d += 8) {
      _mm256_store_ps(sc.q + r * D + d, _mm256_mul_ps(load8_part(Q + rr * dr + d, dr - d), _mm256_set1_ps(c)));
      _mm256_store_ps(sc.o + r * D + d, _mm256_setzero_ps());
    }
  }
  for (int64_t r = 0; r < kQb; ++r) {  // pad rows included (softmax_rows8 takes 8 at a time)
    sc.m[r] = ninf;
    sc.l[r] = 0.f;
  }
  const int64_t kend = p.causal ? q0 + nq : S;
  for (int64_t j0 = 0; j0 < kend; j0 += kBk) {
    const int64_t nj = std::min(kBk, kend - j0), nj16 = (nj + 15) / 16 * 16;
    const float* kt = kp + j0 * D;  // tile j0 / kBk: kBk * D floats per tile
    const float* vt = V + j0 * D;
    // S = Q K^T, then mask: keys past the tile, and (causal) keys after the row's position.
    for (int64_t r = 0; r < nr; r += 6)
      for (int64_t j = 0; j < nj16; j += 16) scores_6x16<D>(sc.q + r * D, kt + j, sc.s + r * kBk + j);
    for (int64_t r = 0; r < nq; ++r) {
      float* s = sc.s + r * kBk;
      const int64_t lim = p.causal ? std::min(nj, q0 + r + 1 - j0) : nj;  // keys < lim
      for (int64_t j = std::max<int64_t>(lim, 0); j < nj16; ++j) s[j] = ninf;
    }
    for (int64_t r = 0; r < nq; r += 8) softmax_rows8(sc.s + r * kBk, nj16, sc.m + r, sc.l + r, sc.alpha + r);
    for (int64_t r = 0; r < nq; r += 6)
      pv_rows<D>(static_cast<int>(std::min<int64_t>(6, nq - r)), sc.o + r * D, sc.s + r * kBk, sc.alpha + r, vt, nj);
  }
  T* O = static_cast<T*>(p.o) + (bh * S + q0) * dr;
  __m256 nan = _mm256_setzero_ps();
  for (int64_t r = 0; r < nq; ++r) {
    const __m256 inv = _mm256_set1_ps(1.f / sc.l[r]);
    for (int d = 0; d < dr; d += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_load_ps(sc.o + r * D + d), inv);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // the columns past dr hold 0 / l
      alignas(32) T part[8];
      T* dst = d + 8 <= dr ? O + r * dr + d : part;  // a row's last values < 8: through `part`
      if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(dst, v);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), avx2::narrow_bf16(v));
      }
      if (dst == part) std::memcpy(O + r * dr + d, part, static_cast<size_t>(dr - d) * sizeof(T));
    }
  }
  seen.note(_mm256_movemask_ps(nan) != 0);
}

// Whether V is packed (bf16 widened, or rows of a head dim dr < D padded to D) rather than read in place.
template <class T, int D> bool v_packed(const AttentionParams& p) { return std::is_same_v<T, u16> || p.D != D; }

// Tile t of kv head u: K transposed into kp ([tile][D][kBk] of that head), V (if v_packed) into vw ([S][D] fp32).
template <class T, int D> void pack_tile(const AttentionParams& p, int64_t u, int64_t t, float* kp, float* vw) {
  const int64_t S = p.S, dr = p.D, j0 = t * kBk, nj = std::min(kBk, S - j0);
  pack_k<T, D>(static_cast<const T*>(p.k) + (u * S + j0) * dr, dr, nj, kp + j0 * D);
  if (v_packed<T, D>(p)) {
    const T* v = static_cast<const T*>(p.v) + (u * S + j0) * dr;
    for (int64_t j = 0; j < nj; ++j)
      for (int d = 0; d < D; d += 8) _mm256_store_ps(vw + (j0 + j) * D + d, load8_part(v + j * dr + d, dr - d));
  }
}

template <class T, int D> bool run(const AttentionParams& p) {
  const int64_t S = p.S, g = p.Hq / p.Hkv, nkv = p.B * p.Hkv, ntiles = (S + kBk - 1) / kBk;
  const int64_t nqb = (S + kQb - 1) / kQb, nitems = p.B * p.Hq * nqb;
  // Packed K of kv head u at kp + u * ktiles ([tile][D][kBk]); packed V of u (v_packed) at vw + u * S * D.
  // With one query block per head (S <= kQb) each item packs its own head (g items alike): no pass over
  // all heads and barrier first (S = 16 / 32, D 64, 16 heads, 2 threads: 17 / 40 us with it, 12 / 35 without).
  const int64_t ktiles = ntiles * kBk * D, vsize = v_packed<T, D>(p) ? S * D : 0;
  const bool own = nqb == 1;
  // Otherwise the kv heads are packed and run a chunk of `chunk` heads at a time (attn::heads_per_pack).
  const int64_t chunk = own ? nkv : attn::heads_per_pack((ktiles + vsize) * 4, nkv);
  attn::NanSeen seen;
  thread_local Keep keep;
  const CallBuffer buf(keep, size_t(own ? 0 : chunk * (ktiles + vsize)) * sizeof(float));
  float* kp = buf.as<float>();
  float* vw = kp + chunk * ktiles;
#pragma omp parallel if (!omp_in_parallel() && nitems > 1)
  {
    constexpr int64_t R = kQb;
    AlignedBuf qb(R * D * 4), ob(R * D * 4), sb(R * kBk * 4, true), ml(3 * R * 4), hb(own ? (ktiles + vsize) * 4 : 0);
    const Scratch sc{qb.as<float>(), ob.as<float>(), sb.as<float>(), ml.as<float>(), ml.as<float>() + R,
                     ml.as<float>() + 2 * R};
    for (int64_t h0 = 0; h0 < nkv; h0 += chunk) {
      const int64_t h1 = std::min(nkv, h0 + chunk);
      if (!own) {
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = h0 * ntiles; t < h1 * ntiles; ++t)  // (implicit barrier) every tile of the chunk packed
          pack_tile<T, D>(p, t / ntiles, t % ntiles, kp + (t / ntiles - h0) * ktiles, vw + (t / ntiles - h0) * vsize);
      }
      // The chunk's query heads (kv head u has heads u g .. u g + g - 1); the implicit barrier keeps the next chunk's
      // packing off these packs until every item is done.
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < (h1 - h0) * g * nqb; ++it) {
        const int64_t bh = h0 * g + it / nqb, qblk = nqb - 1 - it % nqb;  // heaviest (causal) block first
        const int64_t u = bh / g;                                          // its kv head
        const float* K = kp + (u - h0) * ktiles;
        const float* V = vsize ? vw + (u - h0) * vsize : static_cast<const float*>(p.v) + u * S * D;
        if (own) {
          for (int64_t t = 0; t < ntiles; ++t) pack_tile<T, D>(p, u, t, hb.as<float>(), hb.as<float>() + ktiles);
          K = hb.as<float>();
          if (vsize) V = hb.as<float>() + ktiles;
        }
        item<T, D>(p, bh, qblk * kQb, K, V, sc, seen);
      }
    }
  }
  return seen.any.load();
}

}  // namespace

bool attention_avx2(const AttentionParams& p) {
  const bool bf = p.dtype == DType::bf16;
  if (p.dtype != DType::f32 && !bf)
    throw std::invalid_argument(std::string("native cpu attention does not support dtype ") + dtype_name(p.dtype));
  return attn::with_head_dim<16>(p.D, [&](auto d) { return bf ? run<u16, d.value>(p) : run<float, d.value>(p); });
}

}  // namespace pk::cpu

#else  // not x86-64: the tier does not exist (isa_supported(avx2) is false), so this is never called

#include <stdexcept>

namespace pk::cpu {
bool attention_avx2(const AttentionParams&) { throw std::logic_error("the AVX2 tier exists only on x86-64"); }
}  // namespace pk::cpu
#endif
