// Flash-style attention forward, NEON tier (aarch64; see cpu.h, and attention.cpp for the problem).
// Empty on other architectures. ARMv8.0 Advanced SIMD only: no SVE, no BF16-extension instructions.
//
// Work item = (batch, kv head, block of query positions); its rows are the g = Hq/Hkv query heads that
// share the kv head times kRows/g positions (at least one micro-block), so each K/V tile serves the whole
// GQA group. Under a causal mask the heaviest (last) block of a kv head goes first. Rows are handled in
// micro-blocks of kMr = 12 rows (3 q registers of 4 rows each), and every per-row quantity lives
// "vertically", one row per lane:
//   pack       (once per call, in parallel) K tiles of kBk = 64 keys transposed to [D][64] fp32, padded
//              with zero keys; bf16 V widened to fp32 rows (fp32 V is read in place where the rows are
//              whole, below). Per item, each micro-block's Q is transposed to [D][12] fp32 and multiplied by
//              scale * log2 e.
// Head dims 1 to 256: the kernels run at D, the caller's dr rounded up to 16, on rows zero-padded past dr in the
// packs and the Q copy (fp32 V then packed to rows of D as well), cut back in the output stores.
//   S = Q K^T  12 rows x 8 keys = 24 accumulators; per head-dim step 3 loads of Q (12 rows) + 2 of K
//              (8 keys) feed 24 fmla by element (the GEMM micro-kernel's shape, F32Neon in gemm.cpp).
//              The result is S^T: [key][12 rows], so each key's scores are 3 vectors of rows.
//   softmax    online, base 2, fp32, vectorized over the rows: the row maxima and sums are vertical
//              max/add over keys (no horizontal reductions), exp2 by range reduction + a degree-6
//              polynomial; masked keys (past S, or causal future) are -inf before the max.
//   O = a O + P V  12 rows x 8 columns = 24 accumulators; per key 2 loads of V + 3 of P (S^T is the
//              [key][row] layout that fmla by element wants); the rescale by alpha rides on the load of
//              the accumulators.
// Scores of all micro-blocks of a tile come first, then their P.V (independent FMAs around each softmax).
// Threads: a team (team.h) packs the tiles, meets at a barrier, then takes items from a shared ticket.
// bf16 in/out: widened by a 16-bit shift, accumulated in fp32, the output rounded to nearest even exactly
// as float_to_bf16 (scalar.h). A NaN a row attends to makes that row's output NaN, as on the other tiers.
// Verified for correctness only (cross-compiled, run under qemu-aarch64 by tools/cpu_harness): never
// timed on ARM hardware. The block sizes and the single-thread threshold are reasoned (register count,
// L1 size of current ARM cores) or taken from the x86 tiers, not measured on ARM.
#include "cpu/cpu.h"

#if defined(__aarch64__)
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
#include "cpu/team.h"
#include "cpu/vec_neon.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using attn::round_up;
using team::Team;

constexpr int64_t kMr = 12;   // rows per micro-block: 3 vectors of 4 rows
constexpr int64_t kNk = 8;    // keys per score micro-kernel call: 2 vectors
constexpr int64_t kNc = 8;    // output columns per P.V micro-kernel call: 2 vectors
constexpr int64_t kBk = 64;   // keys per K/V tile: 64 x 128 fp32 = 32 KB of K, 32 KB of V at D = 128
constexpr int64_t kRows = 48; // query rows (GQA heads x positions) per work item, at least kMr
static_assert(kMr * kNk / 4 + kMr / 4 + kNk / 4 <= 32, "score accumulators + Q + K fit the 32 registers");
static_assert(kMr * kNc / 4 + kMr / 4 + kNc / 4 <= 32, "P.V accumulators + P + V fit the 32 registers");
static_assert(kBk % kNk == 0 && kRows % kMr == 0, "whole micro-kernel steps");

using neon::exp2_ps;
using neon::load4;
using neon::narrow_bf16;
using neon::transpose4;

// ---- packing ---------------------------------------------------------------------------------------
// The first n (< 4) values at p as 4 floats, the rest 0 (none for n <= 0); all 4 for n >= 4. The row ends of a
// padded head dim: a copy, so nothing past the row is read.
template <class T> inline float32x4_t load4_part(const T* p, int64_t n) {
  if (n >= 4) return load4(p);
  alignas(16) T tmp[4] = {};
  if (n > 0) std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(T));
  return load4(tmp);
}

// dst[d][j] (row stride ld) = scale * src row j, element d, for j < n and d < dr; zero rows for j in [n, jend)
// (jend a multiple of 4) and d in [dr, D). src rows have stride dr. K tiles (ld = kBk, scale 1) and Q micro-blocks
// (ld = kMr, scale * log2 e) both go through here.
template <class T, int D>
inline void pack_transposed(const T* src, int64_t dr, int64_t n, int64_t jend, float scale, float* dst, int64_t ld) {
  const float32x4_t vs = vdupq_n_f32(scale);
  for (int64_t j = 0; j < jend; j += 4)
    for (int d = 0; d < D; d += 4) {
      float32x4_t a[4];
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
        a[u] = j + u < n ? vmulq_f32(load4_part(src + (j + u) * dr + d, dr - d), vs) : vdupq_n_f32(0.f);
      transpose4(a);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) vst1q_f32(dst + (d + u) * ld + j, a[u]);
    }
}

// ---- micro-kernels ---------------------------------------------------------------------------------
// acc[u] (3 vectors of rows) += q rows * lane L of k: key u = 4 * (vector of k) + L.
template <int L>
inline void fma_key(float32x4_t (&acc)[3], float32x4_t q0, float32x4_t q1, float32x4_t q2, float32x4_t k) {
  acc[0] = vfmaq_laneq_f32(acc[0], q0, k, L);
  acc[1] = vfmaq_laneq_f32(acc[1], q1, k, L);
  acc[2] = vfmaq_laneq_f32(acc[2], q2, k, L);
}

// st[u][0:12] = sum_d qt[d][0:12] * kt[d][u], u in [0, 8): scores of 12 rows x 8 keys, transposed.
// qt: [D][12] (pre-scaled); kt: [D][kBk] (this call's 8 keys at column 0).
template <int D>
inline void qk_12x8(const float* __restrict qt, const float* __restrict kt, float* __restrict st) {
  float32x4_t a[8][3];
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u) a[u][0] = a[u][1] = a[u][2] = vdupq_n_f32(0.f);
#pragma GCC unroll 2
  for (int d = 0; d < D; ++d) {
    const float32x4_t q0 = vld1q_f32(qt + d * kMr), q1 = vld1q_f32(qt + d * kMr + 4), q2 = vld1q_f32(qt + d * kMr + 8);
    const float32x4_t k0 = vld1q_f32(kt + d * kBk), k1 = vld1q_f32(kt + d * kBk + 4);
    fma_key<0>(a[0], q0, q1, q2, k0);
    fma_key<1>(a[1], q0, q1, q2, k0);
    fma_key<2>(a[2], q0, q1, q2, k0);
    fma_key<3>(a[3], q0, q1, q2, k0);
    fma_key<0>(a[4], q0, q1, q2, k1);
    fma_key<1>(a[5], q0, q1, q2, k1);
    fma_key<2>(a[6], q0, q1, q2, k1);
    fma_key<3>(a[7], q0, q1, q2, k1);
  }
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u)
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) vst1q_f32(st + u * kMr + 4 * v, a[u][v]);
}

// acc[r] (2 vectors of columns) for the 4 rows of p's lanes: acc[R0 + L] += v * p[L].
template <int L>
inline void fma_row(float32x4_t (&acc)[2], float32x4_t v0, float32x4_t v1, float32x4_t p) {
  acc[0] = vfmaq_laneq_f32(acc[0], v0, p, L);
  acc[1] = vfmaq_laneq_f32(acc[1], v1, p, L);
}
template <int R0>
inline void fma_rows4(float32x4_t (&acc)[kMr][2], float32x4_t v0, float32x4_t v1, float32x4_t p) {
  fma_row<0>(acc[R0], v0, v1, p);
  fma_row<1>(acc[R0 + 1], v0, v1, p);
  fma_row<2>(acc[R0 + 2], v0, v1, p);
  fma_row<3>(acc[R0 + 3], v0, v1, p);
}
template <int L> inline float32x4_t mul_lane(float32x4_t x, float32x4_t a) { return vmulq_laneq_f32(x, a, L); }

// o[r][0:8] = alpha[r] * o[r][0:8] + sum_{j < nj} pt[j][r] * v[j][0:8], r in [0, 12) (o rows of stride D,
// v rows of stride D, pt [kBk][12]).
template <int D>
inline void pv_12x8(float* __restrict o, const float* __restrict pt, const float* __restrict v, int64_t nj,
                    const float* alpha) {
  float32x4_t acc[kMr][2];
  const float32x4_t al[3] = {vld1q_f32(alpha), vld1q_f32(alpha + 4), vld1q_f32(alpha + 8)};
#pragma GCC unroll 3
  for (int g = 0; g < 3; ++g) {
    float* o4 = o + 4 * g * D;
    acc[4 * g][0] = mul_lane<0>(vld1q_f32(o4), al[g]);
    acc[4 * g][1] = mul_lane<0>(vld1q_f32(o4 + 4), al[g]);
    acc[4 * g + 1][0] = mul_lane<1>(vld1q_f32(o4 + D), al[g]);
    acc[4 * g + 1][1] = mul_lane<1>(vld1q_f32(o4 + D + 4), al[g]);
    acc[4 * g + 2][0] = mul_lane<2>(vld1q_f32(o4 + 2 * D), al[g]);
    acc[4 * g + 2][1] = mul_lane<2>(vld1q_f32(o4 + 2 * D + 4), al[g]);
    acc[4 * g + 3][0] = mul_lane<3>(vld1q_f32(o4 + 3 * D), al[g]);
    acc[4 * g + 3][1] = mul_lane<3>(vld1q_f32(o4 + 3 * D + 4), al[g]);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float32x4_t v0 = vld1q_f32(v + j * D), v1 = vld1q_f32(v + j * D + 4);
    const float32x4_t p0 = vld1q_f32(pt + j * kMr), p1 = vld1q_f32(pt + j * kMr + 4),
                      p2 = vld1q_f32(pt + j * kMr + 8);
    fma_rows4<0>(acc, v0, v1, p0);
    fma_rows4<4>(acc, v0, v1, p1);
    fma_rows4<8>(acc, v0, v1, p2);
  }
#pragma GCC unroll 12
  for (int r = 0; r < kMr; ++r) {
    vst1q_f32(o + r * D, acc[r][0]);
    vst1q_f32(o + r * D + 4, acc[r][1]);
  }
}

// Online softmax of one micro-block over this tile's nj computed keys (st [nj][12], base-2 scores).
// Keys j >= lim[r] are masked to -inf first when `mask`. Updates m and l, turns st into probabilities and
// writes the accumulators' rescale factor to alpha. All vertical: lane = row.
inline void softmax_12(float* st, int64_t nj, float* m, float* l, float* alpha, const int32_t* lim, bool mask) {
  const float32x4_t ninf = vdupq_n_f32(-std::numeric_limits<float>::infinity());
  float32x4_t mo[3], mx[3];
#pragma GCC unroll 3
  for (int v = 0; v < 3; ++v) mo[v] = mx[v] = vld1q_f32(m + 4 * v);
  if (mask) {
    const int32x4_t lv[3] = {vld1q_s32(lim), vld1q_s32(lim + 4), vld1q_s32(lim + 8)};
    for (int64_t j = 0; j < nj; ++j) {
      const int32x4_t jv = vdupq_n_s32(static_cast<int32_t>(j));
#pragma GCC unroll 3
      for (int v = 0; v < 3; ++v) {
        const float32x4_t s = vbslq_f32(vcltq_s32(jv, lv[v]), vld1q_f32(st + j * kMr + 4 * v), ninf);
        vst1q_f32(st + j * kMr + 4 * v, s);
        mx[v] = vmaxq_f32(mx[v], s);  // fmax: a NaN score makes the row's max NaN
      }
    }
  } else {
    for (int64_t j = 0; j < nj; ++j)
#pragma GCC unroll 3
      for (int v = 0; v < 3; ++v) mx[v] = vmaxq_f32(mx[v], vld1q_f32(st + j * kMr + 4 * v));
  }
  float32x4_t mu[3], sum[3];
#pragma GCC unroll 3
  for (int v = 0; v < 3; ++v) {
    // A row with every key masked so far keeps m = -inf; subtracting 0 then keeps p = 0, not NaN.
    mu[v] = vbslq_f32(vceqq_f32(mx[v], ninf), vdupq_n_f32(0.f), mx[v]);
    sum[v] = vdupq_n_f32(0.f);
  }
  for (int64_t j = 0; j < nj; ++j)
#pragma GCC unroll 3
    for (int v = 0; v < 3; ++v) {
      const float32x4_t p = exp2_ps(vsubq_f32(vld1q_f32(st + j * kMr + 4 * v), mu[v]));
      vst1q_f32(st + j * kMr + 4 * v, p);
      sum[v] = vaddq_f32(sum[v], p);
    }
#pragma GCC unroll 3
  for (int v = 0; v < 3; ++v) {
    const float32x4_t a = exp2_ps(vsubq_f32(mo[v], mu[v]));
    vst1q_f32(alpha + 4 * v, a);
    vst1q_f32(l + 4 * v, vfmaq_f32(sum[v], vld1q_f32(l + 4 * v), a));
    vst1q_f32(m + 4 * v, mx[v]);
  }
}

// ---- one work item ---------------------------------------------------------------------------------
struct Ctx {
  const void* q;
  void* o;
  const float* kt;  // packed K: [kv heads from h0][ntiles][D][kBk] fp32
  const float* v;   // V rows fp32: [kv heads from vh0][S][D] (the input, or bf16 widened / rows padded past dr)
  int64_t Hq, Hkv, S, g, ntiles, npos;
  int64_t dr;  // the caller's head dim: the row stride of Q, K, V and O (<= D)
  float c;  // scale * log2(e)
  bool causal;
  attn::NanSeen* nan;  // notes a NaN in a stored row
  int64_t h0 = 0, vh0 = 0;  // the kv heads whose rows kt[0] and v[0] hold
};

struct Scratch {
  float* q;  // [rows/12][D][12] transposed, pre-scaled Q of each micro-block
  float* o;  // [rows][D] fp32 accumulators
  float* s;  // [rows/12][kBk][12] scores, then probabilities, of each micro-block
  float* m;  // [rows] running max (base 2)
  float* l;  // [rows] running sum
  float* a;  // [rows] rescale factor of the accumulators for the current tile
};

template <class T, int D>
void item(const Ctx& x, int64_t bkv, int64_t q0, const Scratch& sc) {
  const int64_t S = x.S, g = x.g, np = x.npos, nq = std::min(np, S - q0), nq12 = round_up(nq, kMr);
  const int64_t b = bkv / x.Hkv, hkv = bkv % x.Hkv;
  const T* Q = static_cast<const T*>(x.q);
  for (int64_t hh = 0; hh < g; ++hh) {
    const T* src = Q + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr;
    for (int64_t i0 = 0; i0 < nq; i0 += kMr)
      pack_transposed<T, D>(src + i0 * x.dr, x.dr, std::min(kMr, nq - i0), kMr, x.c, sc.q + (hh * np + i0) * D, kMr);
    std::fill(sc.o + hh * np * D, sc.o + (hh * np + nq12) * D, 0.f);
    std::fill(sc.m + hh * np, sc.m + hh * np + nq12, -std::numeric_limits<float>::infinity());
    std::fill(sc.l + hh * np, sc.l + hh * np + nq12, 0.f);
  }
  const int64_t kend = x.causal ? q0 + nq : S, nt = (kend + kBk - 1) / kBk;
  const float* kp = x.kt + (bkv - x.h0) * x.ntiles * D * kBk;
  const float* vrows = x.v + (bkv - x.vh0) * S * D;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t kt0 = t * kBk, nk = std::min(kBk, S - kt0);
    const float* kt = kp + t * D * kBk;
    const float* vt = vrows + kt0 * D;
    // Keys of this tile that the rows [i0, i0 + 12) of a micro-block see (causal: up to its last position).
    const auto live_keys = [&](int64_t i0) {
      return x.causal ? std::min(nk, q0 + std::min(i0 + kMr, nq) - 1 - kt0 + 1) : nk;
    };
    // Phase 1: scores and softmax of every micro-block.
    for (int64_t hh = 0; hh < g; ++hh)
      for (int64_t i0 = 0; i0 < nq; i0 += kMr) {
        const int64_t r0 = hh * np + i0, nkc = live_keys(i0);
        if (nkc <= 0) continue;  // every key of the tile is in these rows' future
        const int64_t njc = round_up(nkc, kNk);
        float* st = sc.s + r0 * kBk;
        for (int64_t j = 0; j < njc; j += kNk) qk_12x8<D>(sc.q + r0 * D, kt + j, st + j * kMr);
        // Keys j >= lim[r] are masked for row r (past S, or after its position); padding rows (past nq,
        // never stored) borrow the last position, so every row has an unmasked key.
        alignas(16) int32_t lim[kMr];
        bool mask = false;
        for (int r = 0; r < kMr; ++r) {
          const int64_t pos = q0 + std::min<int64_t>(i0 + r, nq - 1);
          const int64_t lr = x.causal ? std::min(nk, std::max<int64_t>(pos - kt0 + 1, 0)) : nk;
          lim[r] = static_cast<int32_t>(lr);
          mask |= lr < njc;
        }
        softmax_12(st, njc, sc.m + r0, sc.l + r0, sc.a + r0, lim, mask);
      }
    // Phase 2: O = alpha O + P V of every micro-block (keys past nkc have p = 0 and are not read).
    for (int64_t hh = 0; hh < g; ++hh)
      for (int64_t i0 = 0; i0 < nq; i0 += kMr) {
        const int64_t r0 = hh * np + i0, nkc = live_keys(i0);
        if (nkc <= 0) continue;
        for (int c = 0; c < D; c += kNc) pv_12x8<D>(sc.o + r0 * D + c, sc.s + r0 * kBk, vt + c, nkc, sc.a + r0);
      }
  }
  T* O = static_cast<T*>(x.o);
  uint32x4_t same = vdupq_n_u32(~0u);  // lanes of every stored value equal to themselves (not NaN)
  for (int64_t hh = 0; hh < g; ++hh) {
    T* dst = O + ((b * x.Hq + hkv * g + hh) * S + q0) * x.dr;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t r = hh * np + i;
      const float32x4_t inv = vdupq_n_f32(1.f / sc.l[r]);
#pragma GCC unroll 4
      for (int d = 0; d < x.dr; d += 8) {
        const float32x4_t y0 = vmulq_f32(vld1q_f32(sc.o + r * D + d), inv);
        const float32x4_t y1 = vmulq_f32(vld1q_f32(sc.o + r * D + d + 4), inv);
        same = vandq_u32(same, vandq_u32(vceqq_f32(y0, y0), vceqq_f32(y1, y1)));  // columns past dr: 0 / l
        alignas(16) T part[8];
        T* to = d + 8 <= x.dr ? dst + i * x.dr + d : part;  // a row's last values < 8: through `part`
        if constexpr (std::is_same_v<T, float>) {
          vst1q_f32(to, y0);
          vst1q_f32(to + 4, y1);
        } else {
          vst1q_u16(to, vcombine_u16(narrow_bf16(y0), narrow_bf16(y1)));
        }
        if (to == part) std::memcpy(dst + i * x.dr + d, part, static_cast<size_t>(x.dr - d) * sizeof(T));
      }
    }
  }
  x.nan->note(vminvq_u32(same) == 0);
}

template <class T, int D>
bool run(const AttentionParams& p) {
  const int64_t Hkv = p.Hkv, S = p.S, g = p.Hq / p.Hkv;
  const int64_t ntiles = (S + kBk - 1) / kBk, nbkv = p.B * Hkv;
  constexpr bool kBf = std::is_same_v<T, u16>;
  const int64_t npos = std::max<int64_t>(kMr, kRows / g / kMr * kMr);
  const int64_t nqb = (S + npos - 1) / npos, nitems = nbkv * nqb, rows = g * npos;
  // One thread up to 2^20 query-row x padded-key x D steps: the x86 tiers' threshold (attention.cpp),
  // not measured on ARM.
  const bool par = p.B * p.Hq * S * ntiles * kBk * D > attn::kAttnParallelSteps;
  const int nt = !par || omp_in_parallel() ? 1 : static_cast<int>(std::clamp<int64_t>(max_threads(), 1, nitems));

  // All memory before the team starts (an exception must not leave a parallel region): packed K (and
  // widened V for bf16), then each thread's item scratch.
  const int64_t dr = p.D;
  const bool v_packed = kBf || dr != D;  // V widened, or its rows padded to D
  // The kv heads are packed and run a chunk of `chunk` heads at a time (attn::heads_per_pack).
  const int64_t chunk = attn::heads_per_pack((ntiles * kBk + (v_packed ? S : 0)) * D * 4, nbkv);
  const size_t kbytes = size_t(chunk * ntiles) * D * kBk * 4, vbytes = v_packed ? size_t(chunk * S) * D * 4 : 0;
  const size_t qo = size_t(rows) * D * 4, so = size_t(rows) * kBk * 4, mo = size_t(rows) * 4;
  const size_t per_thread = round_up(2 * qo + so + 3 * mo, 64);
  thread_local Keep keep;
  const CallBuffer buf(keep, kbytes + vbytes + size_t(nt) * per_thread);
  char* const mem = buf.as<char>();
  float* const kpack = reinterpret_cast<float*>(mem);
  float* const vwide = reinterpret_cast<float*>(mem + kbytes);
  char* const scratch = mem + kbytes + vbytes;

  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  attn::NanSeen nan;
  const Ctx x0{p.q,  p.o,   kpack, v_packed ? vwide : reinterpret_cast<const float*>(p.v), p.Hq, Hkv, S, g, ntiles,
               npos, dr,    p.scale * attn::kLog2e, p.causal, &nan};
  team::run_team(nt, [&](int t, int, Team& tm) {
    char* mine = scratch + size_t(t) * per_thread;
    const Scratch sc{reinterpret_cast<float*>(mine), reinterpret_cast<float*>(mine + qo),
                     reinterpret_cast<float*>(mine + 2 * qo), reinterpret_cast<float*>(mine + 2 * qo + so),
                     reinterpret_cast<float*>(mine + 2 * qo + so + mo),
                     reinterpret_cast<float*>(mine + 2 * qo + so + 2 * mo)};
    for (int64_t h0 = 0; h0 < nbkv; h0 += chunk) {
      const int64_t h1 = std::min(nbkv, h0 + chunk);
      Ctx x = x0;
      x.h0 = h0;
      x.vh0 = v_packed ? h0 : 0;
      for (int64_t it; (it = tm.grab()) < (h1 - h0) * ntiles;) {
        const int64_t bkv = h0 + it / ntiles, kt0 = it % ntiles * kBk, nk = std::min(kBk, S - kt0);
        const int64_t row0 = bkv * S + kt0, prow0 = row0 - h0 * S;  // first row of the tile in k, v and in vwide
        pack_transposed<T, D>(K + row0 * dr, dr, nk, round_up(nk, kNk), 1.f, kpack + it * D * kBk, kBk);
        if (v_packed)
          for (int64_t j = 0; j < nk; ++j)
            for (int d = 0; d < D; d += 4)
              vst1q_f32(vwide + (prow0 + j) * D + d, load4_part(V + (row0 + j) * dr + d, dr - d));
      }
      tm.barrier();
      // Items of one kv head are consecutive (the threads share its packed K/V in the caches); within a
      // head the heaviest (last, under a causal mask) query block goes first.
      for (int64_t it; (it = tm.grab()) < (h1 - h0) * nqb;) {
        const int64_t bkv = h0 + it / nqb, qblk = nqb - 1 - it % nqb;
        item<T, D>(x, bkv, qblk * npos, sc);
      }
      tm.barrier();  // the next chunk's packing overwrites these packs
    }
  });
  return nan.any.load();
}

}  // namespace

bool attention_neon(const AttentionParams& p) {
  const bool bf = p.dtype == DType::bf16;
  if (p.dtype != DType::f32 && !bf)
    throw std::invalid_argument(std::string("native cpu attention does not support dtype ") + dtype_name(p.dtype));
  return attn::with_head_dim<16>(p.D, [&](auto d) { return bf ? run<u16, d.value>(p) : run<float, d.value>(p); });
}

}  // namespace pk::cpu
#endif  // __aarch64__
