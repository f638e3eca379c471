// CPU decode, NEON tier (aarch64): see cpu.h and decode.cpp for the problem (one query token per
// sequence against a contiguous or paged KV cache). Empty on other architectures. ARMv8.0 Advanced SIMD
// only (no SVE, no BF16 extension): bf16 is widened to fp32 in registers with a 16-bit shift (shll) and
// every multiply-add is an fp32 fmla; bf16 outputs are rounded to nearest even like float_to_bf16.
//
// The design is decode_avx2.cpp's, on 4-wide q registers (32 of them). Memory-bound: every K/V row of
// the context is read once. Work item = (sequence, kv head, context chunk) on a contiguous cache, (sequence,
// all kv heads, chunk) on a paged one, run over OpenMP threads (dynamic); an item computes all g = Hq/Hkv
// query heads of the GQA group, so each K/V row comes from memory once and serves the g heads from
// registers or L1. Contexts are split into chunks only when the
// (sequence, kv head) units alone cannot keep every thread busy; chunks leave partials (m, l, o) merged
// by a second pass (log-sum-exp, base 2). Per tile of kT = 32 tokens (row pointers resolved page by page
// through the block table; rows past the tile's end repeat its first, their scores masked):
//   S = q K^T    heads in the lanes: a quad of 4 query heads is stored transposed (qq[d][head]), so one
//                4-column piece of a K row feeds 4 fmla by element (one per column) into the token's
//                accumulator, whose lanes are the 4 heads' scores: 8 tokens = 8 accumulators, no
//                horizontal sums, each K piece loaded (and widened) once per quad; a 4x4 transpose
//                (trn1/trn2) stores them per head. A remainder of 2 or 3 heads runs as a quad with zero
//                query lanes; a single remainder head (g = 1, 5, ...) has the tokens in the lanes: 8 dot
//                accumulators, reduced by pairwise adds (faddp)
//   softmax      online, base 2 (q carries scale * log2 e); fmax/fmaxv keep a NaN score, so it reaches
//                m, l and o; an all -inf tile keeps m = -inf without producing NaN
//   o = a o + P V  blocks of 4 heads x 16 columns = 16 accumulators; per 4 tokens one load of each head's
//                4 probabilities, then fmla by element (lane = token) against each V row's 4 vectors
// The next tile's K and V rows are prefetched while this tile's scores are computed.
// Verified for correctness only (cross-compiled, run under qemu-aarch64 by tools/cpu_harness): never
// timed on ARM hardware.
#include "cpu/cpu.h"

#if defined(__aarch64__)
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/attn_common.h"
#include "cpu/scalar.h"
#include "cpu/vec_neon.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using attn::AlignedBuf;
using attn::round_up;

using neon::exp2_ps;
using neon::exp2_s;
using neon::load16;
using neon::load4;
using neon::store4;
using neon::transpose4;

constexpr int64_t kT = 32;           // tokens per tile: K and V tiles of 16 KB each at D = 128 fp32
constexpr int kTT = 8;               // tokens per q.K step (8 accumulators)
constexpr int kG = 4;                // heads per quad (q.K) and per P.V block
constexpr int kCols = 16;            // columns per P.V block: 4 heads x 4 vectors = 16 accumulators
constexpr int64_t kMinChunk = 256;   // shortest context chunk worth a partial (as decode.cpp)
constexpr int64_t kMinParallelBytes = 256 * 1024;  // below: one thread (a fork/join costs more)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kT % kTT == 0 && kTT == 8, "scores are computed 8 tokens at a time");

struct Ctx {
  const DecodeParams* p;
  int64_t g, chunk, nchunk;
  int64_t nquad;  // quads of heads in the lanes (the last one may hold 2 or 3)
  int64_t hq;     // heads [0, hq) run in quads, [hq, g) one by one (at most one)
  float c;        // scale * log2(e)
  float* part;    // [B*Hkv][nchunk][g][D + 2] (o[D], m, l), or null
};

template <int D, class T> PK_NEON_INLINE void prefetch_row(const T* r) {
  constexpr int kLines = D * int(sizeof(T)) / 64;
  for (int i = 0; i < kLines; ++i) __builtin_prefetch(reinterpret_cast<const char*>(r) + 64 * i, 0, 3);
}

// ---- q . K ---------------------------------------------------------------------------------------

// Scores of a quad of heads (qq[4 d + h] = prepared q of head h, column d) for the 8 rows kr[0..8):
// s[h * kT + t] for the first nh heads of the quad.
template <int D, class T>
PK_NEON_INLINE void scores_quad(const float* qq, const T* const* kr, int64_t nh, float* s) {
  float32x4_t acc[kTT];
#pragma GCC unroll 8
  for (int t = 0; t < kTT; ++t) acc[t] = vdupq_n_f32(0.f);
#pragma GCC unroll 2
  for (int c = 0; c < D; c += 4) {
    const float32x4_t q0 = vld1q_f32(qq + 4 * c), q1 = vld1q_f32(qq + 4 * c + 4);
    const float32x4_t q2 = vld1q_f32(qq + 4 * c + 8), q3 = vld1q_f32(qq + 4 * c + 12);
#pragma GCC unroll 8
    for (int t = 0; t < kTT; ++t) {
      const float32x4_t k = load4(kr[t] + c);
      acc[t] = vfmaq_laneq_f32(acc[t], q0, k, 0);
      acc[t] = vfmaq_laneq_f32(acc[t], q1, k, 1);
      acc[t] = vfmaq_laneq_f32(acc[t], q2, k, 2);
      acc[t] = vfmaq_laneq_f32(acc[t], q3, k, 3);
    }
  }
  // 4x4 transposes: acc[t] lane h -> head h's vector, lane t.
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    float32x4_t h[4] = {acc[4 * half], acc[4 * half + 1], acc[4 * half + 2], acc[4 * half + 3]};
    transpose4(h);
    vst1q_f32(s + 4 * half, h[0]);
    if (nh > 1) vst1q_f32(s + kT + 4 * half, h[1]);
    if (nh > 2) vst1q_f32(s + 2 * kT + 4 * half, h[2]);
    if (nh > 3) vst1q_f32(s + 3 * kT + 4 * half, h[3]);
  }
}

// Lane i = sum of the 4 lanes of a_i (pairwise adds).
PK_NEON_INLINE float32x4_t hsum4(float32x4_t a0, float32x4_t a1, float32x4_t a2, float32x4_t a3) {
  return vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3));
}

// Scores of one head (prepared row q) for the 8 rows kr[0..8): s[0..8).
template <int D, class T>
PK_NEON_INLINE void scores_one(const float* q, const T* const* kr, float* s) {
  float32x4_t acc[kTT];
#pragma GCC unroll 8
  for (int t = 0; t < kTT; ++t) acc[t] = vdupq_n_f32(0.f);
#pragma GCC unroll 4
  for (int c = 0; c < D; c += 4) {
    const float32x4_t qv = vld1q_f32(q + c);
#pragma GCC unroll 8
    for (int t = 0; t < kTT; ++t) acc[t] = vfmaq_f32(acc[t], qv, load4(kr[t] + c));
  }
  vst1q_f32(s, hsum4(acc[0], acc[1], acc[2], acc[3]));
  vst1q_f32(s + 4, hsum4(acc[4], acc[5], acc[6], acc[7]));
}

// ---- softmax -------------------------------------------------------------------------------------

// One online-softmax step (base 2) of a head whose new scores are s[0, n), n a multiple of 4, masked ones
// -inf: m' = max(m, s); s becomes 2^(s - m'); alpha = 2^(m - m') rescales what the head had summed;
// l = l * alpha + sum of the new weights. fmax/fmaxv propagate NaN, so a NaN score makes m, l and o NaN
// (as the other tiers). All scores -inf so far: m stays -inf and 0 is subtracted (p = 0, not NaN).
PK_NEON_INLINE void online_softmax(float* s, int64_t n, float& m, float& l, float& alpha) {
  float32x4_t mx = vdupq_n_f32(m);
  for (int64_t j = 0; j < n; j += 4) mx = vmaxq_f32(mx, vld1q_f32(s + j));
  const float mnew = vmaxvq_f32(mx);
  const float mu = mnew == kNegInf ? 0.f : mnew;
  const float32x4_t vm = vdupq_n_f32(mu);
  float32x4_t sum = vdupq_n_f32(0.f);
  for (int64_t j = 0; j < n; j += 4) {
    const float32x4_t e = exp2_ps(vsubq_f32(vld1q_f32(s + j), vm));
    vst1q_f32(s + j, e);
    sum = vaddq_f32(sum, e);
  }
  alpha = exp2_s(m - mu);
  l = l * alpha + vaddvq_f32(sum);
  m = mnew;
}

// ---- P . V ---------------------------------------------------------------------------------------

// One V row (16 columns at r) times lane L of each head's probability vector pw[h].
template <int G, int L, class T>
PK_NEON_INLINE void pv_row(float32x4_t (&acc)[G][4], const float32x4_t (&pw)[G], const T* r) {
  float32x4_t v[4];
  load16(r, v);
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h)
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) acc[h][x] = vfmaq_laneq_f32(acc[h][x], v[x], pw[h], L);
}

// o[h][c0, c0 + 16) = alpha[h] o[h][...] + sum_j p[h][j] V[j][...] for G (1..4) heads: rows of o stride
// D, of p stride kT.
template <int G, class T>
PK_NEON_INLINE void pv_block(float* o, int64_t D, const float* p, const float* alpha, const T* const* vr,
                             int64_t nj, int c0) {
  float32x4_t acc[G][4];
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h) {
    const float32x4_t a = vdupq_n_f32(alpha[h]);
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) acc[h][x] = vmulq_f32(a, vld1q_f32(o + h * D + c0 + 4 * x));
  }
  int64_t j = 0;
  for (; j + 4 <= nj; j += 4) {
    float32x4_t pw[G];
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h) pw[h] = vld1q_f32(p + h * kT + j);
    pv_row<G, 0>(acc, pw, vr[j] + c0);
    pv_row<G, 1>(acc, pw, vr[j + 1] + c0);
    pv_row<G, 2>(acc, pw, vr[j + 2] + c0);
    pv_row<G, 3>(acc, pw, vr[j + 3] + c0);
  }
  for (; j < nj; ++j) {  // the tile's last 1-3 tokens (rows past nj are never read here)
    float32x4_t v[4];
    load16(vr[j] + c0, v);
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h) {
      const float w = p[h * kT + j];
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) acc[h][x] = vfmaq_n_f32(acc[h][x], v[x], w);
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h)
#pragma GCC unroll 4
    for (int x = 0; x < 4; ++x) vst1q_f32(o + h * D + c0 + 4 * x, acc[h][x]);
}

// ---- one work item, the merge, the driver --------------------------------------------------------

struct Scratch {
  float *q;   // [g][D] prepared query (fp32, times scale * log2 e)
  float *qq;  // [nquad][D][4] the same, heads in the lanes (zero lanes past g)
  float *o;   // [g][D] accumulators
  float *s;   // [g][kT] scores, then probabilities, of the current tile
  float *m, *l, *alpha;  // [g] each
};

// One thread's buffers: the Scratch of its items (nh kv heads of g query heads each: q, qq, o, m and l per kv
// head; s and alpha serve one tile at a time), and acc (D floats) for its merges.
template <int D> struct ThreadScratch {
  AlignedBuf q, qq, o, s, m, acc;
  Scratch sc;
  ThreadScratch(int64_t g, int64_t nquad, int64_t nh)
      : q(static_cast<size_t>(nh * g * D * 4)),
        qq(static_cast<size_t>(nh * std::max<int64_t>(nquad, 1) * kG * D * 4)),
        o(static_cast<size_t>(nh * g * D * 4)), s(static_cast<size_t>(round_up(g, kG) * kT * 4)),
        m(static_cast<size_t>((2 * nh + 1) * g * 4)), acc(static_cast<size_t>(D * 4)),
        sc{q.as<float>(), qq.as<float>(), o.as<float>(), s.as<float>(), m.as<float>(), m.as<float>() + nh * g,
           m.as<float>() + 2 * nh * g} {}
};

// One tile: S = q K^T, online softmax, o = alpha o + P V. kn/vn are the next tile's nn rows, prefetched here.
template <int D, class T>
void tile_compute(const Ctx& x, const Scratch& sc, const T* const* kr, const T* const* vr, const T* const* kn,
                  const T* const* vn, int64_t nj, int64_t nn) {
  const int64_t g = x.g;
  for (int64_t j = 0; j < nj; j += kTT) {
    for (int64_t u = j; u < std::min<int64_t>(j + kTT, nn); ++u) {
      prefetch_row<D>(kn[u]);
      prefetch_row<D>(vn[u]);
    }
    for (int64_t u = 0; u < x.nquad; ++u)
      scores_quad<D>(sc.qq + u * kG * D, kr + j, std::min<int64_t>(kG, g - kG * u), sc.s + kG * u * kT + j);
    for (int64_t h = x.hq; h < g; ++h) scores_one<D>(sc.q + h * D, kr + j, sc.s + h * kT + j);
  }
  const int64_t ns = round_up(nj, 4);
  for (int64_t h = 0; h < g; ++h) {
    float* s = sc.s + h * kT;
    for (int64_t j = nj; j < round_up(nj, kTT); ++j) s[j] = kNegInf;  // padding rows: weight 0
    online_softmax(s, ns, sc.m[h], sc.l[h], sc.alpha[h]);
  }
  int64_t h = 0;
  for (; h + kG <= g; h += kG)
    for (int c0 = 0; c0 < D; c0 += kCols) pv_block<kG>(sc.o + h * D, D, sc.s + h * kT, sc.alpha + h, vr, nj, c0);
  auto rest = [&](auto G) {
    for (int c0 = 0; c0 < D; c0 += kCols) pv_block<G.value>(sc.o + h * D, D, sc.s + h * kT, sc.alpha + h, vr, nj, c0);
  };
  switch (g - h) {
    case 3: rest(std::integral_constant<int, 3>()); break;
    case 2: rest(std::integral_constant<int, 2>()); break;
    case 1: rest(std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Writes the g head rows of o, each times 1 / l[h], to dst (rows of D).
template <int D, class T> void store_rows(T* dst, const float* o, const float* l, int64_t g) {
  for (int64_t h = 0; h < g; ++h) {
    const float32x4_t inv = vdupq_n_f32(1.f / l[h]);
    for (int d = 0; d < D; d += 4) store4(dst + h * D + d, vmulq_f32(vld1q_f32(o + h * D + d), inv));
  }
}

// One work item: the query heads of kv heads [hk0, hk0 + nh) of sequence b, tokens of chunk ci. Steps of kT
// tokens of one kv head, heads inner: on a paged cache nh = Hkv, so the heads' rows of a block (stored
// [Hkv][block_size][D], back to back) are read one after the other instead of one run per block and head, as
// the AVX-512, AVX2 and portable decodes do (on x86, paged caches read 25-40% faster that way; not timed on
// ARM). Each step prefetches the next one's rows.
template <class T, int D> void item(const Ctx& x, int64_t b, int64_t hk0, int64_t nh, int64_t ci, const Scratch& sc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, n = p.context_lens[b], t0 = ci * x.chunk, t1 = std::min(n, t0 + x.chunk);
  const int64_t qqh = x.nquad * kG * D;  // qq floats per kv head
  const T* Q = static_cast<const T*>(p.q) + (b * p.Hq + hk0 * g) * D;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const float32x4_t vc = vdupq_n_f32(x.c);
  for (int64_t h = 0; h < nh * g; ++h) {
    for (int d = 0; d < D; d += 4) {
      vst1q_f32(sc.q + h * D + d, vmulq_f32(load4(Q + h * D + d), vc));
      vst1q_f32(sc.o + h * D + d, vdupq_n_f32(0.f));
    }
    sc.m[h] = kNegInf;
    sc.l[h] = 0.f;
  }
  for (int64_t k = 0; k < nh; ++k)  // qq[k][u][d][lane] = q[k g + 4u + lane][d], zero past g
    for (int64_t u = 0; u < x.nquad; ++u)
      for (int d = 0; d < D; ++d)
        for (int i = 0; i < kG; ++i) {
          const int64_t h = kG * u + i;
          sc.qq[k * qqh + (u * D + d) * kG + i] = h < g ? sc.q[(k * g + h) * D + d] : 0.f;
        }
  const T* kr[kT];
  const T* vr[kT];
  const T* kn[kT];  // the next step's rows
  const T* vn[kT];
  attn::tile_rows(p, K, b, hk0, t0, std::min(kT, t1 - t0), kn);
  attn::tile_rows(p, V, b, hk0, t0, std::min(kT, t1 - t0), vn);
  for (int64_t ts = t0, hk = hk0; ts < t1;) {
    const int64_t nj = std::min(kT, t1 - ts);
    int64_t nts = ts, nhk = hk + 1;  // the next step: the next kv head, or the first one's next tile
    if (nhk == hk0 + nh) {
      nhk = hk0;
      nts += kT;
    }
    const int64_t nn = nts < t1 ? std::min(kT, t1 - nts) : 0;
    for (int64_t j = 0; j < kT; ++j) {  // rows past the tile's end repeat its first (scores masked)
      kr[j] = kn[j < nj ? j : 0];
      vr[j] = vn[j < nj ? j : 0];
    }
    attn::tile_rows(p, K, b, nhk, nts, nn, kn);
    attn::tile_rows(p, V, b, nhk, nts, nn, vn);
    const int64_t k = hk - hk0, h0 = k * g;
    const Scratch hs{sc.q + h0 * D, sc.qq + k * qqh, sc.o + h0 * D, sc.s, sc.m + h0, sc.l + h0, sc.alpha};
    ts = nts;
    hk = nhk;
    tile_compute<D, T>(x, hs, kr, vr, kn, vn, nj, nn);
  }
  for (int64_t k = 0; k < nh; ++k) {
    const int64_t hk = hk0 + k, h0 = k * g;
    if (x.part == nullptr || n <= x.chunk) {  // the sequence's only item: the output directly
      store_rows<D>(static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D, sc.o + h0 * D, sc.l + h0, g);
      continue;
    }
    float* part = x.part + ((b * p.Hkv + hk) * x.nchunk + ci) * g * (D + 2);
    for (int64_t h = 0; h < g; ++h) {
      std::copy(sc.o + (h0 + h) * D, sc.o + (h0 + h + 1) * D, part + h * (D + 2));
      part[h * (D + 2) + D] = sc.m[h0 + h];
      part[h * (D + 2) + D + 1] = sc.l[h0 + h];
    }
  }
}

// Merges the chunk partials of (b, hk) for its g heads into the output (log-sum-exp, base 2). A NaN
// partial (m, l or o) makes its weight or its sum NaN, so the NaN reaches the output.
template <class T, int D> void merge(const Ctx& x, int64_t b, int64_t hk, float* acc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, n = p.context_lens[b];
  if (n <= x.chunk) return;  // written by its only item
  const int64_t nc = (n + x.chunk - 1) / x.chunk;
  const float* part = x.part + (b * p.Hkv + hk) * x.nchunk * g * (D + 2);
  T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
  for (int64_t h = 0; h < g; ++h) {
    float M = kNegInf;
    for (int64_t c = 0; c < nc; ++c) M = std::max(M, part[(c * g + h) * (D + 2) + D]);
    const float mu = M == kNegInf ? 0.f : M;
    float L = 0.f;
    for (int d = 0; d < D; d += 4) vst1q_f32(acc + d, vdupq_n_f32(0.f));
    for (int64_t c = 0; c < nc; ++c) {
      const float* r = part + (c * g + h) * (D + 2);
      const float w = exp2_s(r[D] - mu);
      L += w * r[D + 1];
      for (int d = 0; d < D; d += 4) vst1q_f32(acc + d, vfmaq_n_f32(vld1q_f32(acc + d), vld1q_f32(r + d), w));
    }
    store_rows<D>(O + h * D, acc, &L, 1);
  }
}

template <class T, int D> void run(const DecodeParams& p) {
  const int64_t Hkv = p.Hkv, g = p.Hq / p.Hkv;
  // kv heads per item: all of them on a paged cache (see item), one on a contiguous cache (its context is one
  // long run per head).
  const int64_t nh = p.block_table ? Hkv : 1;
  const attn::DecodeSplit w = attn::split_decode(p, sizeof(T), kT, omp_in_parallel() ? 1 : omp_get_max_threads(),
                                                 kMinChunk, kMinParallelBytes, nh);
  const int64_t nchunk = w.nchunk;
  // Quads: every full one, plus a last one of 2 or 3 heads; a single remaining head goes alone.
  const int64_t nquad = g / kG + (g % kG >= 2 ? 1 : 0), hq = std::min(g, kG * nquad);
  AlignedBuf part(nchunk > 1 ? static_cast<size_t>(p.B * Hkv * nchunk * g * (D + 2) * 4) : 0);
  const Ctx x{&p, g, w.chunk, nchunk, nquad, hq, p.scale * attn::kLog2e, nchunk > 1 ? part.as<float>() : nullptr};
  attn::run_decode_split(
      w, Hkv, [&] { return ThreadScratch<D>(g, nquad, nh); },
      [&](int64_t b, int64_t hk, int64_t c, const ThreadScratch<D>& t) { item<T, D>(x, b, hk, nh, c, t.sc); },
      [&](int64_t b, int64_t hk, const ThreadScratch<D>& t) { merge<T, D>(x, b, hk, t.acc.template as<float>()); });
}

template <class T> void dispatch(const DecodeParams& p) {
  if (p.D == 64) return run<T, 64>(p);
  if (p.D == 128) return run<T, 128>(p);
  throw std::invalid_argument("the NEON decode supports head dims 64 and 128, got " + std::to_string(p.D));
}

}  // namespace

void decode_neon(const DecodeParams& p) {
  if (p.dtype == DType::f32) return dispatch<float>(p);
  if (p.dtype == DType::bf16) return dispatch<u16>(p);
  throw std::invalid_argument(std::string("native cpu decode does not support dtype ") + dtype_name(p.dtype));
}

}  // namespace pk::cpu
#endif  // __aarch64__
