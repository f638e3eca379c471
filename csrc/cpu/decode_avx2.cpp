// Decode attention, AVX2 + FMA tier (see cpu.h and decode.cpp for the problem): one query token per
// sequence against a contiguous or paged KV cache. Built with -mavx2 -mfma -mno-avx512f.
//
// Memory-bound: every K/V row of the context is read once. Work item = (sequence, kv head, context
// chunk); an item computes all g = Hq/Hkv query heads of the GQA group, so each K/V row comes from
// memory once and is reused g times from L1. Contexts are split into chunks only when the
// (sequence, kv head) units alone cannot keep every thread busy; chunks leave partials (m, l, o)
// merged by a second pass (log-sum-exp, base 2). Per tile of kT = 32 tokens, the g heads in passes of
// H = 4, 2 or 1 heads that share every K and V load (8 ymm accumulators each):
//   S = q K^T    8 / H rows at a time: each 32-byte step of a row (8 fp32, or 16 bf16 split into their even
//                and odd elements by a shift and a mask) feeds all H heads; one transposed horizontal sum
//                (hsum8) gives the H x 8 / H scores
//   softmax      online per head, base 2 (q carries scale * log2 e)
//   o = a o + P V  strips of 64 / H columns for the H heads, each strip over the tile's rows, so every V
//                row is read once
// bf16 q and o keep each block of 16 in the loads' [even | odd] order; the output goes back (unperm_row).
// The next tile's K and V rows are prefetched line by line, spread over this tile's loops (one tile = 16
// KB of K and of V ahead at D = 128 fp32). Before (each head's own pass over K, bf16 tiles widened into
// fp32 scratch first), decode harness, forced avx2 tier on a Zen 5, B8 Hq32 Hkv8 L4096 D128, 2 threads:
// fp32 contiguous 29 -> 38 GB/s, bf16 25 -> 39, paged 27 -> 35 / 24 -> 32 (notes/cpu_decode.md).
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

constexpr int64_t kT = 32;        // tokens per tile: K and V tiles of 16 KB each at D = 128 fp32
constexpr int64_t kMinChunk = 256;  // shortest context chunk worth a partial (as decode.cpp)
constexpr int64_t kMinParallelBytes = 256 * 1024;  // below: one thread (a fork/join costs more)
// The next tile's K and V rows (into L2 or L1, see tile_compute). Without, decode harness on the Sapphire
// Rapids VM: paged caches 12-30% slower (bf16 Hkv 8 the same), GQA contiguous ~5% faster (notes/cpu_decode.md).
constexpr bool kSwPrefetch = true;
static_assert(kT % 8 == 0, "scores are computed in blocks of up to 8 tokens, softmax 8 at a time");

struct Ctx {
  const DecodeParams* p;
  int64_t g, chunk, nchunk;
  float c;      // scale * log2(e)
  float* part;  // [B*Hkv][nchunk][g][D + 2] (o[D], m, l), or null
};

inline float exp2_s(float x) { return _mm256_cvtss_f32(avx2::exp2_ps(_mm256_set1_ps(x))); }

// Elements per step of the loops: 8 floats (one 32-byte load), or 16 bf16 (one 32-byte load split into its
// even and odd elements: a shift and a mask, no widening shuffle). bf16 q and o therefore hold each block of
// 16 in that order, [8 even | 8 odd], and the output takes it back (unperm_row).
template <class T> constexpr int kStep = std::is_same_v<T, float> ? 8 : 16;
template <class T> constexpr int kVecs = kStep<T> / 8;  // fp32 vectors per step

template <class T> inline __attribute__((always_inline)) void load_step(const T* p, __m256 (&x)[kVecs<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    x[0] = _mm256_loadu_ps(p);
  } else {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    asm("" : "+x"(raw));  // one load for both halves (else GCC folds a second one into the vpand: in cache +4%)
    x[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));                                      // even
    x[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));  // odd
  }
}

// Marks loaded vectors as registers the compiler may not re-read from memory: left to itself GCC folds a
// load used by several FMAs into each of them (4 loads of one V vector instead of 1), and the loads, not the
// FMAs, then bound the loops (in L1: q.K 6.2 -> 7.1 FMA/ns, P.V 6.6 -> 8.0, fp32, 4 heads).
inline __attribute__((always_inline)) void in_regs(__m256 (&x)[1]) { asm("" : "+x"(x[0])); }
inline __attribute__((always_inline)) void in_regs(__m256 (&x)[2]) { asm("" : "+x"(x[0]), "+x"(x[1])); }

// Scores of H heads (q: H rows of D, scaled, bf16 order for bf16) against the R = 8 / H rows kr[0..R): one
// load of each K step feeds all H heads, 8 accumulators, one transposed sum (hsum8: lane h * R + r). s[h * kT
// + r] = score of head h, row r. With PF, the lines of the R rows pf[0..R) (the next tile's) are prefetched,
// spread over the steps (about one per step), into L1 or L2 as l1 says.
template <int H, int D, bool PF, class T>
inline __attribute__((always_inline)) void dots(const float* q, const T* const* kr, float* s, const T* const* pf,
                                                bool l1) {
  constexpr int R = 8 / H, E = kStep<T>, NX = kVecs<T>, Steps = D / E;
  constexpr int Lines = D * int(sizeof(T)) / 64, Total = R * Lines;
  // q's addresses as base + constant: left to itself GCC hoists all H x Steps of them out of the caller's
  // row loop and spills them to the stack (a reload per q load; in cache 42 -> 32 GB/s, fp32 g = 4)
  asm("" : "+r"(q));
  const T* k[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) k[r] = kr[r];
  __m256 acc[8];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int i = 0; i < Steps; ++i) {
    if constexpr (PF)
#pragma GCC unroll 8
      for (int l = i * Total / Steps; l < (i + 1) * Total / Steps; ++l)
        attn::prefetch_stream(reinterpret_cast<const char*>(pf[l % R]) + 64 * (l / R), l1);
    if constexpr (H * NX > 4) {  // bf16, 4 heads: the q vectors would not fit beside the rows; q outer
      __m256 x[R][NX];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        load_step(k[r] + i * E, x[r]);
        in_regs(x[r]);
      }
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h)
#pragma GCC unroll 2
        for (int v = 0; v < NX; ++v) {
          const __m256 qv = _mm256_load_ps(q + h * D + i * E + 8 * v);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) acc[h * R + r] = _mm256_fmadd_ps(qv, x[r][v], acc[h * R + r]);
        }
    } else {  // rows outer, q in registers
      __m256 qv[H][NX];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h)
#pragma GCC unroll 2
        for (int v = 0; v < NX; ++v) qv[h][v] = _mm256_load_ps(q + h * D + i * E + 8 * v);
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) in_regs(qv[h]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m256 x[NX];
        load_step(k[r] + i * E, x);
        in_regs(x);
#pragma GCC unroll 4
        for (int h = 0; h < H; ++h)
#pragma GCC unroll 2
          for (int v = 0; v < NX; ++v) acc[h * R + r] = _mm256_fmadd_ps(qv[h][v], x[v], acc[h * R + r]);
      }
    }
  }
  const __m256 sums = avx2::hsum8(acc);
  if constexpr (H == 1) {
    _mm256_storeu_ps(s, sums);
  } else if constexpr (H == 2) {
    _mm_storeu_ps(s, _mm256_castps256_ps128(sums));
    _mm_storeu_ps(s + kT, _mm256_extractf128_ps(sums, 1));
  } else {
    const __m128 lo = _mm256_castps256_ps128(sums), hi = _mm256_extractf128_ps(sums, 1);
    _mm_storel_pi(reinterpret_cast<__m64*>(s), lo);
    _mm_storeh_pi(reinterpret_cast<__m64*>(s + kT), lo);
    _mm_storel_pi(reinterpret_cast<__m64*>(s + 2 * kT), hi);
    _mm_storeh_pi(reinterpret_cast<__m64*>(s + 3 * kT), hi);
  }
}

// o = alpha o + P V for H heads (o: H rows of D, bf16 order for bf16; p: H rows of kT weights) in strips of
// W = 64 / H columns (8 accumulators), each strip over the tile's rows: every V row is read once, a strip
// (64 bytes of fp32) at a time. The first pass of heads also prefetches each strip's lines of the next
// tile's rows vn[0..nn).
template <int H, int D, class T>
inline __attribute__((always_inline)) void pv(float* o, const float* p, const float* alpha, const T* const* vr,
                                              int64_t nj, const T* const* vn, int64_t nn, bool l1) {
  constexpr int W = 64 / H, NV = W / 8, E = kStep<T>, NX = kVecs<T>;
  static_assert(D % W == 0 && W % E == 0, "whole steps per strip, whole strips per row");
  for (int c0 = 0; c0 < D; c0 += W) {
    __m256 acc[H][NV];
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h) {
      const __m256 a = _mm256_set1_ps(alpha[h]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[h][v] = _mm256_mul_ps(a, _mm256_load_ps(o + h * D + c0 + 8 * v));
    }
    // the lines that start in the strip (a bf16 strip of 16 columns is half a line: every other strip)
    constexpr int PL = std::max(1, W * int(sizeof(T)) / 64);
    const int64_t npf = (c0 * int(sizeof(T))) % 64 == 0 ? nn : 0;
    for (int64_t j = 0; j < nj; ++j) {
      if (j < npf)
#pragma GCC unroll 4
        for (int l = 0; l < PL; ++l)
          attn::prefetch_stream(reinterpret_cast<const char*>(vn[j] + c0) + 64 * l, l1);
      __m256 w[H];
#pragma GCC unroll 4
      for (int h = 0; h < H; ++h) w[h] = _mm256_broadcast_ss(p + h * kT + j);
      const T* r = vr[j] + c0;
#pragma GCC unroll 8
      for (int e = 0; e < W / E; ++e) {
        __m256 x[NX];
        load_step(r + e * E, x);
        in_regs(x);
#pragma GCC unroll 2
        for (int v = 0; v < NX; ++v)
#pragma GCC unroll 4
          for (int h = 0; h < H; ++h) acc[h][e * NX + v] = _mm256_fmadd_ps(w[h], x[v], acc[h][e * NX + v]);
      }
    }
#pragma GCC unroll 4
    for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm256_store_ps(o + h * D + c0 + 8 * v, acc[h][v]);
  }
}

struct Scratch {
  float *q, *o, *s, *m, *l, *alpha;
};

// One thread's buffers: the Scratch of its items (nh kv heads of g query heads each), and acc (D floats) for
// its merges.
template <class T, int D> struct ThreadScratch {
  AlignedBuf q, o, s, m, acc;
  Scratch sc;
  ThreadScratch(int64_t g, int64_t nh)
      : q(static_cast<size_t>(nh * g * D * 4)), o(static_cast<size_t>(nh * g * D * 4)), s(static_cast<size_t>(g * kT * 4)),
        m(static_cast<size_t>((2 * nh + 1) * g * 4)), acc(static_cast<size_t>(D * 4)),
        sc{q.as<float>(), o.as<float>(), s.as<float>(), m.as<float>(), m.as<float>() + nh * g, m.as<float>() + 2 * nh * g} {}
};

// Calls f(std::integral_constant<int, H>{}, h) for the passes of H = 4, 2, 1 heads that cover the g heads.
template <class F> inline __attribute__((always_inline)) void head_passes(int64_t g, F f) {
  int64_t h = 0;
  for (; h + 4 <= g; h += 4) f(std::integral_constant<int, 4>{}, h);
  for (; h + 2 <= g; h += 2) f(std::integral_constant<int, 2>{}, h);
  if (h < g) f(std::integral_constant<int, 1>{}, h);
}

// One tile: S = q K^T, online softmax, o = alpha o + P V, the g heads in passes of up to 4 that share each
// K and V load. kn/vn are the next tile's nn rows, prefetched by the first pass: the K rows' lines spread over
// the score steps, the V rows' a strip at a time by the P.V strips (notes/cpu_decode.md).
template <int D, class T>
void tile_compute(const Scratch& sc, const T* const* kr, const T* const* vr, const T* const* kn, const T* const* vn,
                  int64_t nj, int64_t nn, int64_t g, bool l1) {
  const int64_t npf = kSwPrefetch ? nn : 0;
  head_passes(g, [&](auto hc, int64_t h) {
    constexpr int H = decltype(hc)::value, R = 8 / H;
    for (int64_t j = 0; j < nj; j += R) {
      if (h == 0 && j + R <= npf) {
        dots<H, D, true>(sc.q + h * D, kr + j, sc.s + h * kT + j, kn + j, l1);
      } else {
        dots<H, D, false>(sc.q + h * D, kr + j, sc.s + h * kT + j, kn + j, l1);
        for (int64_t u = j; h == 0 && u < std::min(j + R, npf); ++u)  // the last rows of a short next tile
          for (int b = 0; b < D * int(sizeof(T)); b += 64)
            attn::prefetch_stream(reinterpret_cast<const char*>(kn[u]) + b, l1);
      }
    }
  });
  // Online softmax per head (scores past nj masked to -inf, i.e. weight 0).
  for (int64_t h = 0; h < g; ++h) {
    float* s = sc.s + h * kT;
    for (int64_t j = nj; j < round_up(nj, 8); ++j) s[j] = -std::numeric_limits<float>::infinity();
    avx2::online_softmax(s, round_up(nj, 8), sc.m[h], sc.l[h], sc.alpha[h]);
  }
  head_passes(g, [&](auto hc, int64_t h) {
    constexpr int H = decltype(hc)::value;
    pv<H, D>(sc.o + h * D, sc.s + h * kT, sc.alpha + h, vr, nj, vn, h == 0 ? npf : 0, l1);
  });
}

// 8 floats to the output's type: fp32 as they are, bf16 rounded to nearest even.
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
inline void store8(u16* dst, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), avx2::narrow_bf16(v)); }

// A row of D from the kernel's order (T = bf16: [8 even | 8 odd] per 16) to the plain one, times mul, stored as
// Out (the output's type, or fp32 for a chunk's partial).
template <class T, int D, class Out> inline void unperm_row(const float* src, float mul, Out* dst) {
  const __m256 m = _mm256_set1_ps(mul);
  for (int d = 0; d < D; d += 16) {
    const __m256 a = _mm256_mul_ps(_mm256_load_ps(src + d), m), b = _mm256_mul_ps(_mm256_load_ps(src + d + 8), m);
    if constexpr (std::is_same_v<T, float>) {
      store8(dst + d, a);
      store8(dst + d + 8, b);
    } else {  // a = elements 0, 2, .., 14, b = 1, 3, .., 15: interleave
      const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // 0 1 2 3 8 9 10 11 | 4 5 6 7 12 ..
      store8(dst + d, _mm256_permute2f128_ps(lo, hi, 0x20));
      store8(dst + d + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
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
    for (int d = 0; d < D; d += kStep<T>) {  // scaled, in the loops' order (load_step's)
      __m256 v[kVecs<T>];
      load_step(Q + h * D + d, v);
      for (int i = 0; i < kVecs<T>; ++i) _mm256_store_ps(sc.q + h * D + d + 8 * i, _mm256_mul_ps(v[i], _mm256_set1_ps(x.c)));
    }
    for (int d = 0; d < D; d += 8) _mm256_store_ps(sc.o + h * D + d, _mm256_setzero_ps());
    sc.m[h] = -std::numeric_limits<float>::infinity();
    sc.l[h] = 0.f;
  }
  const bool l1 = attn::t_prefetch_l1;  // once per item (attn::prefetch_stream)
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
    const Scratch hs{sc.q + h0 * D, sc.o + h0 * D, sc.s, sc.m + h0, sc.l + h0, sc.alpha};
    ts = nts;
    hk = nhk;
    tile_compute<D, T>(hs, kr, vr, kn, vn, nj, nn, g, l1);
  }
  for (int64_t hk = hk0; hk < hk0 + nh; ++hk) {
    const int64_t h0 = (hk - hk0) * g;
    if (x.nchunk == 1) {
      T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
      for (int64_t h = 0; h < g; ++h) unperm_row<T, D>(sc.o + (h0 + h) * D, 1.f / sc.l[h0 + h], O + h * D);
      continue;
    }
    float* part = x.part + ((b * p.Hkv + hk) * x.nchunk + ci) * g * (D + 2);
    for (int64_t h = 0; h < g; ++h) {
      unperm_row<T, D>(sc.o + (h0 + h) * D, 1.f, part + h * (D + 2));
      part[h * (D + 2) + D] = sc.m[h0 + h];
      part[h * (D + 2) + D + 1] = sc.l[h0 + h];
    }
  }
}

template <class T, int D> void merge(const Ctx& x, int64_t b, int64_t hk, float* acc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, nc = (p.context_lens[b] + x.chunk - 1) / x.chunk;
  T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
  attn::merge_partials(x.part + (b * p.Hkv + hk) * x.nchunk * g * (D + 2), nc, g, D + 2, D, acc, exp2_s,
                       [&](int64_t h, const float* a, float L) {
                         for (int d = 0; d < D; ++d) {
                           if constexpr (std::is_same_v<T, float>) {
                             O[h * D + d] = a[d] / L;
                           } else {
                             O[h * D + d] = float_to_bf16(a[d] / L);
                           }
                         }
                       });
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
