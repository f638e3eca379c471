// Decode attention, AVX2 + FMA tier (see cpu.h and decode.cpp for the problem): one query token per
// sequence against a contiguous or paged KV cache. Built with -mavx2 -mfma -mno-avx512f.
//
// Memory-bound: every K/V row of the context is read once. Work item = (sequence, kv head, context
// chunk); an item computes all g = Hq/Hkv query heads of the GQA group, so each K/V row comes from
// memory once and is reused g times from L1. Contexts are split into chunks only when the
// (sequence, kv head) units alone cannot keep every thread busy; chunks leave partials (m, l, o)
// merged by a second pass (log-sum-exp, base 2). Per tile of kT = 32 tokens:
//   S = q K^T    per head, 8 tokens at a time: 8 dot-product accumulators over D, one transposed
//                horizontal sum (hsum8) gives the 8 scores
//   softmax      online, base 2 (q carries scale * log2 e)
//   o = a o + P V  32 columns x 2 heads = 8 ymm accumulators; V rows widened from bf16 in registers
// The next tile's K and V rows are prefetched while this tile's scores are computed (one tile = 16 KB
// of K and of V ahead at D = 128 fp32).
#include "cpu/cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/attn_common.h"
#include "cpu/scalar.h"
#include "cpu/vec_avx2.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using attn::AlignedBuf;
using attn::round_up;
using attn::prefetch_stream;

constexpr int64_t kT = 32;         // tokens per tile: K and V tiles of 16 KB each at D = 128 fp32
constexpr int64_t kMinChunk = 256;  // shortest context chunk worth a partial (as decode.cpp)
constexpr int64_t kMinParallelBytes = 256 * 1024;  // below: one thread (a fork/join costs more)
// The next tile's K and V rows (into L2, see tile_compute). Without, decode harness on the Sapphire Rapids
// VM: paged caches 12-30% slower (bf16 Hkv 8 the same), GQA contiguous ~5% faster (notes/cpu_decode.md).
constexpr bool kSwPrefetch = true;
static_assert(kT % 8 == 0, "scores are computed 8 tokens at a time");

struct Ctx {
  const DecodeParams* p;
  int64_t g, chunk, nchunk;
  float c;      // scale * log2(e)
  float* part;  // [B*Hkv][nchunk][g][D + 2] (o[D], m, l), or null
};

inline float exp2_s(float x) { return _mm256_cvtss_f32(avx2::exp2_ps(_mm256_set1_ps(x))); }

// Into L2 or L1 as this CPU's level says (cpu.h stream_prefetch), as the AVX-512 kernel.
template <int D, class T> inline void prefetch_row(const T* r) {
  constexpr int kLines = D * int(sizeof(T)) / 64;
  for (int i = 0; i < kLines; ++i) prefetch_stream(reinterpret_cast<const char*>(r) + 64 * i);
}

// s[j] = q . K[j] for the 8 rows kr[0..8).
template <int D, class T> inline __m256 dot8(const float* q, const T* const* kr) {
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_load_ps(q + d);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, avx2::load8(kr[u] + d), acc[u]);
  }
  return avx2::hsum8(acc);
}

// o[h][c0..c0+32) for H (1 or 2) heads: o = alpha o + sum_j p[h][j] V[j].
// The first block of heads also prefetches columns [c0, c0 + 32) of the next tile's first nn rows vn.
template <int H, class T, class N>
inline void pv_block(float* o, int64_t D, const float* p, const float* alpha, const T* const* vr, int64_t nj, int c0,
                     const N* const* vn, int64_t nn) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h) {
    const __m256 a = _mm256_set1_ps(alpha[h]);
    for (int v = 0; v < 4; ++v) acc[h][v] = _mm256_mul_ps(a, _mm256_load_ps(o + h * D + c0 + 8 * v));
  }
  for (int64_t j = 0; j < nj; ++j) {
    if (j < nn)
      for (int b = 0; b < 32 * int(sizeof(N)); b += 64)
        prefetch_stream(reinterpret_cast<const char*>(vn[j] + c0) + b);
    const T* r = vr[j] + c0;
    const __m256 v0 = avx2::load8(r), v1 = avx2::load8(r + 8), v2 = avx2::load8(r + 16), v3 = avx2::load8(r + 24);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      const __m256 w = _mm256_broadcast_ss(p + h * kT + j);
      acc[h][0] = _mm256_fmadd_ps(w, v0, acc[h][0]);
      acc[h][1] = _mm256_fmadd_ps(w, v1, acc[h][1]);
      acc[h][2] = _mm256_fmadd_ps(w, v2, acc[h][2]);
      acc[h][3] = _mm256_fmadd_ps(w, v3, acc[h][3]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int v = 0; v < 4; ++v) _mm256_store_ps(o + h * D + c0 + 8 * v, acc[h][v]);
}

struct Scratch {
  float *q, *o, *s, *m, *l, *alpha;
  float *kw, *vw;  // bf16 with g > 1: the tile's K and V rows widened to fp32 once (kT x D each)
};

// One thread's buffers: the Scratch of its items (nh kv heads of g query heads each), and acc (D floats) for
// its merges.
template <class T, int D> struct ThreadScratch {
  AlignedBuf q, o, s, m, kw, vw, acc;
  Scratch sc;
  ThreadScratch(int64_t g, int64_t nh)
      : q(static_cast<size_t>(nh * g * D * 4)), o(static_cast<size_t>(nh * g * D * 4)), s(static_cast<size_t>(g * kT * 4)),
        m(static_cast<size_t>((2 * nh + 1) * g * 4)), kw(widen(g) ? static_cast<size_t>(kT * D * 4) : 0),
        vw(widen(g) ? static_cast<size_t>(kT * D * 4) : 0), acc(static_cast<size_t>(D * 4)),
        sc{q.as<float>(), o.as<float>(), s.as<float>(), m.as<float>(), m.as<float>() + nh * g,
           m.as<float>() + 2 * nh * g, kw.as<float>(), vw.as<float>()} {}
  static bool widen(int64_t g) { return std::is_same_v<T, u16> && g > 1; }
};

// One tile: S = q K^T, online softmax, o = alpha o + P V. R is the row type the loops read (T, or
// float when a bf16 tile was widened); kn/vn are the next tile's nn rows, prefetched here: the K rows
// by the score loop, 8 at a time, the V rows by the first P.V block of each strip of columns, a strip
// per pass (not a burst of the whole tile: bf16 Hkv 8 / 32 paged, 2 threads, 11.5-12.8 / 17.3-17.8 ->
// 13.2-13.4 / 17.8-18.0 GB/s; notes/cpu_decode.md).
template <class R, int D, class T>
void tile_compute(const Scratch& sc, const R* const* kr, const R* const* vr, const T* const* kn, const T* const* vn,
                  int64_t nj, int64_t nn, int64_t g) {
  for (int64_t j = 0; j < nj; j += 8) {
    if (kSwPrefetch)
      for (int64_t u = j; u < std::min(j + 8, nn); ++u) prefetch_row<D>(kn[u]);
    for (int64_t h = 0; h < g; ++h) _mm256_store_ps(sc.s + h * kT + j, dot8<D>(sc.q + h * D, kr + j));
  }
  // Online softmax per head (scores past nj masked to -inf, i.e. weight 0).
  for (int64_t h = 0; h < g; ++h) {
    float* s = sc.s + h * kT;
    for (int64_t j = nj; j < round_up(nj, 8); ++j) s[j] = -std::numeric_limits<float>::infinity();
    avx2::online_softmax(s, round_up(nj, 8), sc.m[h], sc.l[h], sc.alpha[h]);
  }
  // o = alpha o + P V, 2 heads x 32 columns at a time.
  const int64_t npf = kSwPrefetch ? nn : 0;
  int64_t h = 0;
  for (; h + 2 <= g; h += 2)
    for (int c0 = 0; c0 < D; c0 += 32)
      pv_block<2>(sc.o + h * D, D, sc.s + h * kT, sc.alpha + h, vr, nj, c0, vn, h == 0 ? npf : 0);
  for (; h < g; ++h)
    for (int c0 = 0; c0 < D; c0 += 32)
      pv_block<1>(sc.o + h * D, D, sc.s + h * kT, sc.alpha + h, vr, nj, c0, vn, h == 0 ? npf : 0);
}

// One work item: the query heads of kv heads [hk0, hk0 + nh) of sequence b, tokens of chunk ci. Steps of
// kT tokens of one kv head, heads inner: on a paged cache nh = Hkv, so the heads' rows of a block (stored
// [Hkv][block_size][D], back to back) are read one after the other instead of one 8 KB run per block and
// head (decode.cpp does the same). Decode harness, B8 Hq32 L4096 D128 paged16, 2 threads: fp32 Hkv 32
// 17.3-17.9 -> 23.7-24.5 GB/s, bf16 Hkv 8 9.8-10.2 -> 8.3-9.2 ms (notes/cpu_decode.md). Each step
// prefetches the next one's rows.
template <class T, int D> void item(const Ctx& x, int64_t b, int64_t hk0, int64_t nh, int64_t ci, const Scratch& sc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, n = p.context_lens[b], t0 = ci * x.chunk, t1 = std::min(n, t0 + x.chunk);
  const T* Q = static_cast<const T*>(p.q) + (b * p.Hq + hk0 * g) * D;
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  for (int64_t h = 0; h < nh * g; ++h) {
    for (int d = 0; d < D; d += 8)
      _mm256_store_ps(sc.q + h * D + d, _mm256_mul_ps(avx2::load8(Q + h * D + d), _mm256_set1_ps(x.c)));
    for (int d = 0; d < D; d += 8) _mm256_store_ps(sc.o + h * D + d, _mm256_setzero_ps());
    sc.m[h] = -std::numeric_limits<float>::infinity();
    sc.l[h] = 0.f;
  }
  const T* kr[kT];
  const T* vr[kT];
  const T* kn[kT];  // the next step's rows
  const T* vn[kT];
  attn::tile_rows(p, K, b, hk0, t0, std::min(kT, t1 - t0), kn);
  attn::tile_rows(p, V, b, hk0, t0, std::min(kT, t1 - t0), vn);
  for (int64_t ts = t0, hk = hk0; ts < t1;) {
    const int64_t nj = std::min(kT, t1 - ts);
    int64_t nts = ts, nhk = hk + 1;
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
    const int64_t h0 = (hk - hk0) * g;
    const Scratch hs{sc.q + h0 * D, sc.o + h0 * D, sc.s, sc.m + h0, sc.l + h0, sc.alpha, sc.kw, sc.vw};
    ts = nts;
    hk = nhk;
    if constexpr (std::is_same_v<T, u16>) {
      // g heads would widen every bf16 element g times (load + vpmovzxwd + shift per 8 values, 3 uops
      // per FMA); widen the tile once into L1 and run the fp32 loops on it.
      if (g > 1) {
        const float* kf[kT];
        const float* vf[kT];
        for (int64_t j = 0; j < kT; ++j) {
          float* kd = sc.kw + j * D;
          float* vd = sc.vw + j * D;
          if (j < nj || j == 0)
            for (int d = 0; d < D; d += 8) {
              _mm256_store_ps(kd + d, avx2::load8(kr[j] + d));
              _mm256_store_ps(vd + d, avx2::load8(vr[j] + d));
            }
          kf[j] = j < nj ? kd : sc.kw;
          vf[j] = j < nj ? vd : sc.vw;
        }
        tile_compute<float, D>(hs, kf, vf, kn, vn, nj, nn, g);
        continue;
      }
    }
    tile_compute<T, D>(hs, kr, vr, kn, vn, nj, nn, g);
  }
  for (int64_t hk = hk0; hk < hk0 + nh; ++hk) {
    const int64_t h0 = (hk - hk0) * g;
    if (x.nchunk == 1) {
      T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
      for (int64_t h = 0; h < g; ++h) {
        const __m256 inv = _mm256_set1_ps(1.f / sc.l[h0 + h]);
        for (int d = 0; d < D; d += 8) {
          const __m256 v = _mm256_mul_ps(_mm256_load_ps(sc.o + (h0 + h) * D + d), inv);
          if constexpr (std::is_same_v<T, float>) {
            _mm256_storeu_ps(O + h * D + d, v);
          } else {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(O + h * D + d), avx2::narrow_bf16(v));
          }
        }
      }
      continue;
    }
    float* part = x.part + ((b * p.Hkv + hk) * x.nchunk + ci) * g * (D + 2);
    for (int64_t h = 0; h < g; ++h) {
      std::copy(sc.o + (h0 + h) * D, sc.o + (h0 + h) * D + D, part + h * (D + 2));
      part[h * (D + 2) + D] = sc.m[h0 + h];
      part[h * (D + 2) + D + 1] = sc.l[h0 + h];
    }
  }
}

template <class T, int D> void merge(const Ctx& x, int64_t b, int64_t hk, float* acc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, nc = (p.context_lens[b] + x.chunk - 1) / x.chunk;
  const float* part = x.part + (b * p.Hkv + hk) * x.nchunk * g * (D + 2);
  T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
  for (int64_t h = 0; h < g; ++h) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < nc; ++c) M = std::max(M, part[(c * g + h) * (D + 2) + D]);
    float L = 0.f;
    std::fill(acc, acc + D, 0.f);
    for (int64_t c = 0; c < nc; ++c) {
      const float* r = part + (c * g + h) * (D + 2);
      const float w = exp2_s(r[D] - M);
      L += w * r[D + 1];
      for (int d = 0; d < D; ++d) acc[d] += w * r[d];
    }
    for (int d = 0; d < D; ++d) {
      if constexpr (std::is_same_v<T, float>) {
        O[h * D + d] = acc[d] / L;
      } else {
        O[h * D + d] = float_to_bf16(acc[d] / L);
      }
    }
  }
}

template <class T, int D> void run(const DecodeParams& p) {
  const int64_t Hkv = p.Hkv, g = p.Hq / p.Hkv;
  // kv heads per item: all of them on a paged cache (see item), one on a contiguous cache (its context is
  // one long run per head).
  const int64_t nh = p.block_table ? Hkv : 1;
  const attn::DecodeSplit w = attn::split_decode(p, sizeof(T), kT, omp_in_parallel() ? 1 : omp_get_max_threads(),
                                                 kMinChunk, kMinParallelBytes, nh);
  const int64_t nchunk = w.nchunk;
  AlignedBuf part(nchunk > 1 ? static_cast<size_t>(p.B * Hkv * nchunk * g * (D + 2) * 4) : 0);
  const Ctx x{&p, g, w.chunk, nchunk, p.scale * attn::kLog2e, nchunk > 1 ? part.as<float>() : nullptr};
  attn::run_decode_split(
      w, Hkv, [&] { return ThreadScratch<T, D>(g, nh); },
      [&](int64_t b, int64_t hk, int64_t c, const ThreadScratch<T, D>& t) { item<T, D>(x, b, hk, nh, c, t.sc); },
      [&](int64_t b, int64_t hk, const ThreadScratch<T, D>& t) { merge<T, D>(x, b, hk, t.acc.template as<float>()); });
}

template <class T> void dispatch(const DecodeParams& p) {
  if (p.D == 64) return run<T, 64>(p);
  if (p.D == 128) return run<T, 128>(p);
  throw std::invalid_argument("the AVX2 decode supports head dims 64 and 128, got " + std::to_string(p.D));
}

}  // namespace

void decode_avx2(const DecodeParams& p) {
  if (p.dtype == DType::f32) return dispatch<float>(p);
  if (p.dtype == DType::bf16) return dispatch<u16>(p);
  throw std::invalid_argument(std::string("native cpu decode does not support dtype ") + dtype_name(p.dtype));
}

}  // namespace pk::cpu

#else  // not x86-64: the tier does not exist (isa_supported(avx2) is false), so this is never called

#include <stdexcept>

namespace pk::cpu {
void decode_avx2(const DecodeParams&) { throw std::logic_error("the AVX2 tier exists only on x86-64"); }
}  // namespace pk::cpu
#endif
