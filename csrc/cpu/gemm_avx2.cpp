// CPU GEMM, AVX2 + FMA tier (see cpu.h): C[M,N] = A[M,K] . B[K,N], row-major, fp32 accumulation,
// f32 and bf16 in/out. Built with -mavx2 -mfma -mno-avx512f (CMakeLists.txt).
//
// Paths:
//   dot     M <= 4 with B stored [N, K] (linear): dot products along K, each row of B read once.
//   direct  M <= 4 (decode batches): B streamed once, never packed (bf16 widened in registers); items
//           of 64 rows of B go to the threads dynamically, each adds 4 rows of B per pass into a
//           private fp32 partial of the C rows; the partials are summed at the end.
//   in place  fp32 with K <= 1024 and A and B within L2 (M > 4; up to ~200 rows, else up to 512 KB of L2): the 6 x 16
//           micro-kernel on A's rows and B's rows where they are, no packing (B stored [N, K]: one 16-column panel
//           transposed per item; gemm_in_place).
//   packed  BLIS-style: work items are (MC rows x NC columns) blocks of C, handed out dynamically (MC smaller
//           when that leaves fewer than ~3 items per thread);
//           the rows of A are packed into [k][6] panels and B into [k][16] panels per K block (KC)
//           (bf16 widened to fp32 while packing; from B^T when B is stored [N, K], transb): once for
//           the call, shared by the threads, up to kSharedPackBytes, else per item. The 6 x 16
//           micro-kernel runs over the tiles: 12 ymm accumulators + 2 B vectors + 1 broadcast = 15 of
//           the 16 ymm registers.
//           Each k step: 2 loads of B, 6 broadcasts, 12 FMAs (2 FMA pipes: 6 cycles).
// Block sizes come from the caches the CPU reports (cpu.h caches()), not from constants:
//   KC: a B micro-panel (KC x 16 fp32) takes half of L1d (32 KB L1d -> KC = 256). The tiles of an item
//       run along rows of C: the A micro-panel (KC x 6, a few KB) stays in L1d while the B panels of
//       the block stream past it from L2, and each C tile row continues the previous one. (Down the
//       columns, B panel in L1d and A panels streaming, 2048^3 fp32 on the Sapphire Rapids VM took
//       173-186 / 84-90 ms on 1 / 2 threads; along the rows 163-170 / 80-84.)
//   MC, NC: the packed A block (MC x KC), the packed B block (KC x NC) and the C block (MC x NC) each
//       take a quarter of L2 (1 MB L2 -> MC = 252, NC = 256; 2 MB -> 504, 512).
// No AMX, no AVX-512 here by construction: this is what an AVX2-only CPU runs.
#include "cpu/cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/scalar.h"
#include "cpu/scratch.h"
#include "cpu/vec_avx2.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
constexpr int MR = 6, NR = 16;
// M up to this: direct path (each element of B feeds at most 4 FMAs: memory-bound, packing B would
// only add traffic).
constexpr int64_t kDirectMaxM = 4;
// Below this many FLOPs one thread does it all (an OpenMP fork/join costs microseconds).
constexpr double kSerialFlops = 2.0e6;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline float ldf(const float* p, int64_t i) { return p[i]; }
inline float ldf(const u16* p, int64_t i) { return bf16_to_float(p[i]); }

struct Blocking {
  int64_t kc, mc, nc;
};
const Blocking& blocking() {
  static const Blocking b = [] {
    const Caches& c = caches();
    const int64_t kc = std::clamp<int64_t>(c.l1d / 2 / (NR * 4) / 8 * 8, 64, 1024);
    const int64_t mc = std::clamp<int64_t>(c.l2 / 4 / (kc * 4) / MR * MR, 4 * MR, 2046);
    const int64_t nc = std::clamp<int64_t>(c.l2 / 4 / (kc * 4) / NR * NR, 4 * NR, 4096);
    return Blocking{kc, mc, nc};
  }();
  return b;
}

int pick_threads(const GemmParams& p, double from_flops = kSerialFlops) {
  const double flops = 2.0 * double(p.M) * double(p.N) * double(p.K);
  return flops < from_flops || omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads());
}
// The direct and dot paths take threads from this many FLOPs (not kSerialFlops) when they have 4 items or more
// (gemm.cpp's rule, from fewer FLOPs: a row costs more here). Forced avx2 tier, Sapphire Rapids VM, 2 threads,
// prepared linear calls, one thread -> two (us, builds alternated twice): 1 x 512 x 512 14.0-15.9 -> 7.8-9.3,
// 4 x 1024 x 64 14.6-15.0 -> 9.4-10.0, 8 x 256 x 256 18.0-18.2 -> 10.4-10.6, 1 x 1024 x 128 7.9 -> 6.3-6.4,
// 2 x 512 x 128 5.4-5.5 -> 4.6-4.8, 4 x 256 x 128 5.4 -> 4.6-5.7; GEMM fp32 / bf16 1 x 1024 x 256 17.5-17.6 ->
// 12.0-12.4 / 20.9-21.7 -> 14.4-14.5, 1 x 2048 x 256 48-52 -> 25 / 44-46 -> 26-27, 3 x 256 x 512 14.0-14.1 -> 11.1-11.2
// / 18.4-18.9 -> 13.6-13.8, but 2 x 256 x 256 fp32 5.3-5.7 -> 5.9-6.0.
constexpr double kFewRowsThreadFlops = 0.25e6;
int few_rows_threads(const GemmParams& p, int64_t items) {
  return pick_threads(p, items >= 4 ? kFewRowsThreadFlops : kSerialFlops);
}

// Per-thread scratch kept between calls (scratch.h: no page faults per call), contents undefined. Slot 0:
// a thread's own blocks; slot 1: the calling thread's packed operands shared by the team.
float* scratch(size_t floats, int slot = 0) {
  thread_local Keep keep[2];
  return static_cast<float*>(keep[slot].get(floats * sizeof(float)));
}

// ---- packing --------------------------------------------------------------------------------------
// rows [0, mr) x kc of A (row stride lda) -> dst[k][MR], rows mr..MR-1 zero.
template <class T> void pack_a(const T* a, int64_t lda, int mr, int64_t kc, float* dst) {
  if (mr == MR) {
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {  // 6 rows x 8 k: loads along k, scattered by a small transpose
      alignas(32) float t[MR][8];
      for (int r = 0; r < MR; ++r) _mm256_store_ps(t[r], avx2::load8(a + r * lda + k));
      for (int kk = 0; kk < 8; ++kk)
        for (int r = 0; r < MR; ++r) dst[(k + kk) * MR + r] = t[r][kk];
    }
    for (; k < kc; ++k)
      for (int r = 0; r < MR; ++r) dst[k * MR + r] = ldf(a, r * lda + k);
    return;
  }
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < MR; ++r)
      dst[k * MR + r] =
          r < mr ? ldf(a, r * lda + k) : 0.f;
}

// kc x nc of B (row stride ldb) -> panels of [k][NR], panel q at q*kc*NR, columns past nc zero.
template <class T> void pack_b(const T* b, int64_t ldb, int64_t kc, int64_t nc, float* dst) {
  const int64_t full = nc / NR;
  for (int64_t k = 0; k < kc; ++k) {
    const T* row = b + k * ldb;
    _mm_prefetch(reinterpret_cast<const char*>(row + 2 * ldb), _MM_HINT_T0);
    for (int64_t q = 0; q < full; ++q) {
      float* d = dst + (q * kc + k) * NR;
      _mm256_store_ps(d, avx2::load8(row + q * NR));
      _mm256_store_ps(d + 8, avx2::load8(row + q * NR + 8));
    }
    if (full * NR < nc) {
      float* d = dst + (full * kc + k) * NR;
      for (int64_t j = 0; j < NR; ++j)
        d[j] = full * NR + j < nc ? ldf(row, full * NR + j) : 0.f;
    }
  }
}

// B stored [N, K] (a linear layer's weight, GemmParams::transb; row stride ldb = K): the same panels as
// pack_b from B^T. Per panel, 8 K values of each of its 16 rows are loaded (contiguous) and transposed in
// registers (two 8 x 8 transposes) into 8 rows of the panel's [k][16] order. The element-by-element scatter this
// replaced took half of a short-K linear's time: forced avx2 tier on the Sapphire Rapids VM, 1 thread, prepared
// calls, 6 / 8 / 16 x 1024 x 64 31.5 / 35.8 / 45.3 -> 14.7 / 19.2 / 32.2 us, 8 x 1024 x 256 131 -> 75.
template <class T> void pack_bt(const T* w, int64_t ldb, int64_t kc, int64_t nc, float* dst) {
  for (int64_t q = 0; q * NR < nc; ++q) {
    const int64_t nr = std::min<int64_t>(NR, nc - q * NR);
    float* d = dst + q * kc * NR;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      __m256 t[2][8];
      for (int j = 0; j < NR; ++j)
        t[j / 8][j % 8] = j < nr ? avx2::load8(w + (q * NR + j) * ldb + k) : _mm256_setzero_ps();
      avx2::transpose8(t[0]);
      avx2::transpose8(t[1]);
      for (int kk = 0; kk < 8; ++kk) {
        _mm256_store_ps(d + (k + kk) * NR, t[0][kk]);
        _mm256_store_ps(d + (k + kk) * NR + 8, t[1][kk]);
      }
    }
    for (; k < kc; ++k)
      for (int j = 0; j < NR; ++j) d[k * NR + j] = j < nr ? ldf(w, (q * NR + j) * ldb + k) : 0.f;
  }
}

// ---- 6 x 16 micro-kernel ---------------------------------------------------------------------------
constexpr int64_t kAPrefetchSteps = 32;
// c[r][j] (+)= sum_k a[k][r] * b[k][j]; all 6 x 16 values are written (c must have room).
template <bool Acc> void kernel(const float* a, const float* b, int64_t kc, float* c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
#define PK_STEP(kk)                                                                  \
  {                                                                                  \
    const __m256 b0 = _mm256_load_ps(b + (kk) * NR), b1 = _mm256_load_ps(b + (kk) * NR + 8); \
    __m256 av = _mm256_broadcast_ss(a + (kk) * MR + 0);                              \
    c00 = _mm256_fmadd_ps(av, b0, c00);                                              \
    c01 = _mm256_fmadd_ps(av, b1, c01);                                              \
    av = _mm256_broadcast_ss(a + (kk) * MR + 1);                                     \
    c10 = _mm256_fmadd_ps(av, b0, c10);                                              \
    c11 = _mm256_fmadd_ps(av, b1, c11);                                              \
    av = _mm256_broadcast_ss(a + (kk) * MR + 2);                                     \
    c20 = _mm256_fmadd_ps(av, b0, c20);                                              \
    c21 = _mm256_fmadd_ps(av, b1, c21);                                              \
    av = _mm256_broadcast_ss(a + (kk) * MR + 3);                                     \
    c30 = _mm256_fmadd_ps(av, b0, c30);                                              \
    c31 = _mm256_fmadd_ps(av, b1, c31);                                              \
    av = _mm256_broadcast_ss(a + (kk) * MR + 4);                                     \
    c40 = _mm256_fmadd_ps(av, b0, c40);                                              \
    c41 = _mm256_fmadd_ps(av, b1, c41);                                              \
    av = _mm256_broadcast_ss(a + (kk) * MR + 5);                                     \
    c50 = _mm256_fmadd_ps(av, b0, c50);                                              \
    c51 = _mm256_fmadd_ps(av, b1, c51);                                              \
  }
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    // The A panel's next 128 bytes kAPrefetchSteps steps ahead (4 steps use 96): measured when the tiles
    // ran down the columns (A streaming from L2), 2048^3 on the Sapphire Rapids VM, 1 / 2 threads:
    // 184-189 / 88-90 -> 168-178 / 82-87 ms with the shared packing (16-48 steps alike); along the
    // rows it still pays (without: 171-179 / 82-88 against 163-172 / 82-86 ms).
    _mm_prefetch(reinterpret_cast<const char*>(a + kAPrefetchSteps * MR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a + kAPrefetchSteps * MR + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 8 * NR), _MM_HINT_T0);
    PK_STEP(0) PK_STEP(1) PK_STEP(2) PK_STEP(3)
    a += 4 * MR;
    b += 4 * NR;
  }
  for (; k < kc; ++k) {
    PK_STEP(0)
    a += MR;
    b += NR;
  }
#undef PK_STEP
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    __m256 v0 = acc[r][0], v1 = acc[r][1];
    if (Acc) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, v0);
    _mm256_storeu_ps(cr + 8, v1);
  }
}

// One mr x nc tile (mr <= 6, nc <= 16) into c (row stride ldc), through a full tile when partial.
void tile(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int mr, int nc, bool acc) {
  if (mr == MR && nc == NR) return acc ? kernel<true>(a, b, kc, c, ldc) : kernel<false>(a, b, kc, c, ldc);
  alignas(32) float t[MR * NR];
  kernel<false>(a, b, kc, t, NR);
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nc; ++j) c[r * ldc + j] = acc ? c[r * ldc + j] + t[r * NR + j] : t[r * NR + j];
}

// A and B packed once for the whole call, shared by the threads, when both together take at most this
// many bytes; past it every item packs the blocks it uses. Per-item packing packed B once per row block
// and A once per column block: 2048^3 fp32 on the Sapphire Rapids VM (MC = NC = 336: 7 x 7 items) spent
// 13% of its time in the packing loops (perf), 3-4% packed once; alone it did not change the time (the
// blocks then come from L3 on first use), with the A prefetch of the micro-kernel it is 2-6% faster.
constexpr int64_t kSharedPackBytes = int64_t(64) << 20;

template <class T> void gemm_packed(const GemmParams& p) {
  const Blocking& bl = blocking();
  const int64_t M = p.M, N = p.N, K = p.K, KC = bl.kc, NC = bl.nc;
  // Row blocks small enough for ~3 items per thread: with one block of MC x NC (M, N <= 336 with a 2 MB L2) one
  // thread did all the work.
  const int64_t want = cdiv(3 * int64_t(pick_threads(p)), cdiv(N, NC));
  const int64_t MC = std::clamp(cdiv(cdiv(M, want), MR) * MR, int64_t(MR), bl.mc);
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  constexpr bool kBf16 = std::is_same_v<T, u16>;
  const int64_t mb = cdiv(M, MC), nb = cdiv(N, NC), kb = cdiv(K, KC), items = mb * nb;
  // Shared packing: the k block at k0 of row block ib at sa + (ib K + k0) MC ([mc/6 panels][kc][6]), of
  // column block jb at sb + (jb K + k0) NC ([nc/16 panels][kc][16]).
  const bool shared = items > 1 && double(mb * MC + nb * NC) * double(K) * 4 <= double(kSharedPackBytes);
  const int64_t a_floats = cdiv(mb * MC * K, 8) * 8;  // B's panels start 32-byte aligned (the kernel's aligned loads)
  float* sa = shared ? scratch(static_cast<size_t>(a_floats + nb * NC * K), 1) : nullptr;
  float* sb = shared ? sa + a_floats : nullptr;
  const int64_t units = shared ? (mb + nb) * kb : 0;
  auto pack_rows = [&](int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
    for (int64_t i = 0; i < mc; i += MR)
      pack_a(A + (i0 + i) * K + k0, K, static_cast<int>(std::min<int64_t>(MR, mc - i)), kc, dst + i * kc);
  };
  auto pack_cols = [&](int64_t j0, int64_t nc, int64_t k0, int64_t kc, float* dst) {
    if (p.transb) pack_bt(B + j0 * K + k0, K, kc, nc, dst);
    else pack_b(B + k0 * N + j0, N, kc, nc, dst);
  };
  const int nt = static_cast<int>(std::min<int64_t>(pick_threads(p), std::max(items, units)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // Own blocks: A block [MC/6 panels][KC][6] and B block [NC/16 panels][KC][16] (unless shared), the C
    // block of a bf16 output [MC][NC].
    const int64_t own = shared ? 0 : MC * KC + NC * KC;
    float* ws = scratch(static_cast<size_t>(own + (kBf16 ? MC * NC : 0) + 1));
    float* cb = ws + own;
    if (shared) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) {  // (implicit barrier) every block packed
        const int64_t blk = u / kb, k0 = (u % kb) * KC, kc = std::min(KC, K - k0);
        if (blk < mb) pack_rows(blk * MC, std::min(MC, M - blk * MC), k0, kc, sa + (blk * K + k0) * MC);
        else pack_cols((blk - mb) * NC, std::min(NC, N - (blk - mb) * NC), k0, kc, sb + ((blk - mb) * K + k0) * NC);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      // Items of one column block are consecutive: the threads share its rows of B in L3.
      const int64_t ib = it % mb, jb = it / mb, i0 = ib * MC, j0 = jb * NC;
      const int64_t mc = std::min(MC, M - i0), nc = std::min(NC, N - j0);
      float* c = kBf16 ? cb : static_cast<float*>(p.c) + i0 * N + j0;
      const int64_t ldc = kBf16 ? NC : N;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const float* ap = sa ? sa + (ib * K + k0) * MC : ws;
        const float* bp = sb ? sb + (jb * K + k0) * NC : ws + MC * KC;
        if (!shared) {
          pack_rows(i0, mc, k0, kc, ws);
          pack_cols(j0, nc, k0, kc, ws + MC * KC);
        }
        for (int64_t i = 0; i < mc; i += MR)  // along the rows: the A micro-panel stays in L1d (KC above)
          for (int64_t j = 0; j < nc; j += NR)
            tile(ap + i * kc, bp + j * kc, kc, c + i * ldc + j, ldc, static_cast<int>(std::min<int64_t>(MR, mc - i)),
                 static_cast<int>(std::min<int64_t>(NR, nc - j)), k0 > 0);
      }
      if constexpr (kBf16) {
        u16* C = static_cast<u16*>(p.c);
        for (int64_t i = 0; i < mc; ++i) {
          int64_t j = 0;
          for (; j + 8 <= nc; j += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(C + (i0 + i) * N + j0 + j),
                             avx2::narrow_bf16(_mm256_loadu_ps(cb + i * NC + j)));
          for (; j < nc; ++j) C[(i0 + i) * N + j0 + j] = float_to_bf16(cb[i * NC + j]);
        }
      }
    }
  }
}

// ---- direct path (M <= 4) --------------------------------------------------------------------------
// acc[m][0..w) += sum over rows [k0, k1) of A[m][k] * B[k][j0..j0+w), 4 rows of B per pass; a block
// of up to 64 rows is summed in `tmp` first and then added (K/64 + 64 additions in a row per output,
// not K: the error stays at the level of torch's). Rows of up to 16 KB are taken as 4 streams of
// (k1 - k0) / 4 consecutive rows each (pass r reads rows k0 + r + u rs), as the avx512 direct path does
// (cpu.h kSplitRowBytes): each stream runs on through contiguous memory instead of ending with its row.
// C++ driver, tier forced on Zen 5, K = N = 4096, M = 1, alternated 3x: 1 thread bf16 21.9-22.5 -> 26.1-29.0
// GB/s, fp32 34.0-35.3 -> 35.6-38.8; 2 threads bf16 37.8-38.5 -> 42.2-46.3, fp32 49.8-50.4 -> 51.8-52.3.
template <int M, class T>
void direct_block(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t k0, int64_t k1, int64_t j0, int64_t w,
                  float* acc, float* tmp) {
  const int64_t wv = w / 8 * 8;
  for (int64_t i = 0; i < M * w; ++i) tmp[i] = 0.f;
  const bool split = k1 - k0 >= 4 && (k1 - k0) % 4 == 0 && w * int64_t(sizeof(T)) <= kSplitRowBytes;
  const int64_t rs = split ? (k1 - k0) / 4 : 1, passes = split ? rs : (k1 - k0) / 4;
  const int64_t ldr = rs * ldb;  // between a pass's rows
  for (int64_t r = 0; r < passes; ++r) {
    const int64_t k = split ? k0 + r : k0 + 4 * r;
    const T* b = B + k * ldb + j0;
    __m256 av[M][4];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 4; ++u) av[m][u] = _mm256_set1_ps(ldf(A, m * lda + k + u * rs));
    // each stream's row two passes ahead
    for (int u = 0; u < 4; ++u)
      _mm_prefetch(reinterpret_cast<const char*>(b + u * ldr + (split ? 2 : 8) * ldb), _MM_HINT_T0);
    for (int64_t j = 0; j < wv; j += 8) {
      const __m256 b0 = avx2::load8(b + j), b1 = avx2::load8(b + ldr + j), b2 = avx2::load8(b + 2 * ldr + j),
                   b3 = avx2::load8(b + 3 * ldr + j);
      for (int m = 0; m < M; ++m) {
        float* t = tmp + m * w + j;
        __m256 s = _mm256_fmadd_ps(av[m][0], b0, _mm256_loadu_ps(t));
        __m256 s1 = _mm256_mul_ps(av[m][1], b1);
        s = _mm256_fmadd_ps(av[m][2], b2, s);
        s1 = _mm256_fmadd_ps(av[m][3], b3, s1);
        _mm256_storeu_ps(t, _mm256_add_ps(s, s1));
      }
    }
    for (int64_t j = wv; j < w; ++j)
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < 4; ++u)
          tmp[m * w + j] += ldf(A, m * lda + k + u * rs) * ldf(B, (k + u * rs) * ldb + j0 + j);
  }
  for (int64_t k = split ? k1 : k0 + 4 * passes; k < k1; ++k)
    for (int m = 0; m < M; ++m) {
      const float a = ldf(A, m * lda + k);
      for (int64_t j = 0; j < w; ++j) tmp[m * w + j] += a * ldf(B, k * ldb + j0 + j);
    }
  for (int64_t i = 0; i < M * w; ++i) acc[i] += tmp[i];
}

// Work items are blocks of 64 whole rows of B (one contiguous run per column chunk), handed out
// dynamically: a thread that loses its core to another process (2-core shared VM) does fewer of them
// instead of holding the others up. Each thread adds its items into a private fp32 partial of the C
// rows (M x W floats, 64 KB: L2); the partials are summed at the end of each column chunk.
template <int M, class T> void gemm_direct(const GemmParams& p) {
  constexpr int64_t kRows = 64;
  const int64_t N = p.N, K = p.K;
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int64_t W = std::min<int64_t>(cdiv(N, 8) * 8, 16384 / M / 8 * 8), items = cdiv(K, kRows);
  const int nt = static_cast<int>(std::min<int64_t>(few_rows_threads(p, items), items));
  // The calling thread's arena (thread 0 of the team) holds every partial, then thread 0's item buffer.
  float* parts = scratch(static_cast<size_t>((nt + 1) * M * W));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    float* part = parts + t * M * W;
    float* tmp = t == 0 ? parts + nt * M * W : scratch(static_cast<size_t>(M * W));
    for (int64_t j0 = 0; j0 < N; j0 += W) {
      const int64_t w = std::min(W, N - j0);
      std::fill(part, part + M * w, 0.f);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it)
        direct_block<M, T>(A, K, B, N, it * kRows, std::min(K, (it + 1) * kRows), j0, w, part, tmp);
      // (implicit barrier) every partial is complete; sum them, columns split over the threads
      const int64_t c0 = w * t / n, c1 = w * (t + 1) / n;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = c0; j < c1; ++j) {
          float v = 0.f;
          for (int u = 0; u < n; ++u) v += parts[u * M * W + m * w + j];  // partials are M x w
          if constexpr (std::is_same_v<T, float>) {
            static_cast<float*>(p.c)[m * N + j0 + j] = v;
          } else {
            static_cast<u16*>(p.c)[m * N + j0 + j] = float_to_bf16(v);
          }
        }
#pragma omp barrier
    }
  }
}

// ---- linear, M <= 4 (B stored [N, K]): dot products ---------------------------------------------------
// C[m][n] = A[m] . W[n], both rows contiguous in K: NU rows of W at a time against all M rows of A,
// M x NU ymm accumulators (<= 8) summed horizontally at the end. Items are blocks of 64 rows of W,
// handed out dynamically; each row of W is read once. NU streams of consecutive rows per item: tier forced on
// Zen 5, N = K = 4096, alternated 3x: 1 thread M1 bf16 22.1-22.5 -> 36.2-37.7 GB/s, fp32 34.9-37.5 ->
// 42.9-45.6, M4 +15-25%; 2 threads M1 bf16 38.6-41.1 -> 68.8-71.8, fp32 66.7-69.2 -> 79.3-86.3.
// Linear (B [N, K]) up to kDotMaxM rows: each output the dot product of a row of A and a row of B, both contiguous in
// K; NU rows of B a step (4 / 2 / 1 up to M = 2 / 4 / 8). From 5 rows, a B within L2 and K <= kInPlaceLinearKPerRow
// M run in place instead (B's panels transposed: at short K the dot path's horizontal sums outweigh the FMAs). Forced
// avx2 tier on the Sapphire Rapids VM, 2 threads, prepared calls (us), rows 5-8 before (in place within L2, else
// gemm_packed, which transposes all of B per call) -> dot: 5 / 8 x 4096 x 4096 3108 / 3974 -> 2494-2578 / 3397-3498, 8
// x 1024 x 1024 503 -> 137, 8 x 1024 x 256 48 -> 40, 8 x 256 x 256 19.4 -> 16.9, 6 x 512 x 512 38.8 -> 31.3; but 6 /
// 8 x 1024 x 64 15.6 / 21.2 -> 19.9 / 25.0 (those stay in place).
constexpr int64_t kDotMaxM = 8;
constexpr int64_t kInPlaceLinearKPerRow = 12;
template <int M, class T> void gemm_dot(const GemmParams& p) {
  constexpr int NU = M <= 2 ? 4 : M <= 4 ? 2 : 1;
  constexpr int64_t kRows = 64;
  const int64_t N = p.N, K = p.K, K8 = K / 8 * 8, items = cdiv(N, kRows);
  const T* A = static_cast<const T*>(p.a);
  const T* W = static_cast<const T*>(p.b);
  const int nt = static_cast<int>(std::min<int64_t>(few_rows_threads(p, items), items));
  auto store = [&](int64_t m, int64_t n, float v) {
    if constexpr (std::is_same_v<T, float>) static_cast<float*>(p.c)[m * N + n] = v;
    else static_cast<u16*>(p.c)[m * N + n] = float_to_bf16(v);
  };
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t n0 = it * kRows, n1 = std::min(N, (it + 1) * kRows);
    // an item of a multiple of NU rows: NU streams of consecutive rows (pass r takes rows n0 + r + u rs), as
    // the avx512 dot path (gemm.cpp dot_rows), else NU consecutive rows per pass
    const bool split = (n1 - n0) % NU == 0;
    const int64_t rs = split ? (n1 - n0) / NU : 1, passes = split ? rs : (n1 - n0) / NU;
    for (int64_t r = 0; r < passes; ++r) {
      const int64_t n = split ? n0 + r : n0 + NU * r;
      __m256 acc[M][NU];
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < NU; ++u) acc[m][u] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        __m256 w[NU];
        for (int u = 0; u < NU; ++u) w[u] = avx2::load8(W + (n + u * rs) * K + k);
        for (int m = 0; m < M; ++m) {
          const __m256 a = avx2::load8(A + m * K + k);
          for (int u = 0; u < NU; ++u) acc[m][u] = _mm256_fmadd_ps(a, w[u], acc[m][u]);
        }
      }
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < NU; ++u) {
          float v = avx2::hsum(acc[m][u]);
          for (int64_t k = K8; k < K; ++k) v += ldf(A, m * K + k) * ldf(W, (n + u * rs) * K + k);
          store(m, n + u * rs, v);
        }
    }
    for (int64_t n = split ? n1 : n0 + NU * passes; n < n1; ++n)  // fewer than NU rows of W left in the item
      for (int m = 0; m < M; ++m) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8)
          acc = _mm256_fmadd_ps(avx2::load8(A + m * K + k), avx2::load8(W + n * K + k), acc);
        float v = avx2::hsum(acc);
        for (int64_t k = K8; k < K; ++k) v += ldf(A, m * K + k) * ldf(W, n * K + k);
        store(m, n, v);
      }
  }
}

// ---- in place: small fp32 GEMMs (as gemm.cpp's gemm_in_place) ---------------------------------------
// The 6 x 16 tile on A's rows where they are (lda apart, each value broadcast from its row) and on B's rows where
// they are (ldb apart; masked loads past nc unless Full) or on a packed panel (ldb = NR, zero-padded: Full), all of
// K; stored with masks past nc.
template <int R, bool Full> void tile_in_place(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                                               float* c, int64_t ldc, int nc) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nc - 8), lane);
  for (int64_t k = 0; k < K; ++k) {
    const float* br = b + k * ldb;
    const __m256 b0 = Full ? _mm256_loadu_ps(br) : _mm256_maskload_ps(br, m0);
    const __m256 b1 = Full ? _mm256_loadu_ps(br + 8) : _mm256_maskload_ps(br + 8, m1);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (nc == NR) {
      _mm256_storeu_ps(cr, acc[r][0]);
      _mm256_storeu_ps(cr + 8, acc[r][1]);
    } else {
      _mm256_maskstore_ps(cr, m0, acc[r][0]);
      _mm256_maskstore_ps(cr + 8, m1, acc[r][1]);
    }
  }
}
using InPlaceFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int);
template <bool Full> constexpr InPlaceFn in_place_tiles[MR] = {&tile_in_place<1, Full>, &tile_in_place<2, Full>,
                                                              &tile_in_place<3, Full>, &tile_in_place<4, Full>,
                                                              &tile_in_place<5, Full>, &tile_in_place<6, Full>};
// Taken when K <= kInPlaceMaxK (A's rows are read as K-long streams) and A and B together fit in L2 (at most
// kInPlaceManyRowsBytes of it past kInPlaceL2Panels row panels); threads from
// kInPlaceThreadFlops when each gets 3 row panels or more. Forced tier on the Sapphire Rapids VM, 2 threads, prepared
// calls against torch capped to AVX2 (as tools/isa_tiers.py caps it) in turns, native / torch fp32 before -> after
// (with the row blocks of gemm_packed below): 64^3 0.77 -> 1.20, 96^3 0.59 -> 1.01, 128^3 0.51 -> 0.94,
// 64 x 256 x 256 0.51 -> 1.02, 32 x 128 x 128 -> 1.08, 32 x 512 x 512 0.56 -> 0.87, 256^3 0.52 -> 0.97,
// linear alike (256^3 1.00). The kernel runs at half the AVX-512 rate, so threads pay from fewer FLOPs than in
// gemm.cpp.
// Up to L2 only with at most kInPlaceL2Panels row panels (~200 rows); more rows, a quarter of it on the Sapphire
// Rapids VM: C++ driver, 2 threads, the two paths alternated (best-worst of 5 rounds, two runs, us, packed / in
// place): 384^3 556-577 / 572-631, 448^3 790-811 / 914-965, 512^3 1286-1328 / 1451-1756, 256 x 1024 x 256 623-640 /
// 726-842, 320^3 303-312 / 311-332; but 256^3 178-186 / 160-165, 64 x 512 x 256 107-115 / 91-103, 100 x 100 x 1000 133-138 / 104-110,
// 150 x 200 x 1000 360-365 / 311-338, 200 x 300 x 800 491-499 / 438-479, 128 x 512 x 512 351-353 / 333-457.
// Past kInPlaceL2Panels the bound is kInPlaceManyRowsBytes or L2 if smaller: a quarter of the Sapphire Rapids VM's
// 2 MB L2 (above), half of the Zen 4 VM's 1 MB, where in place still won at 512 KB (Zen 4 VM, family 25, 2 threads,
// prepared calls against torch capped to AVX2, two rounds, L2 / 4 -> 512 KB: 256^3 196-197 -> 155-156 us, torch
// 173-176; linear 256^3 191 -> 152; 320^3, 800 KB, in place there 304 against 340 packed, but on the Sapphire
// Rapids VM 311-332 against 303-312, so it stays packed).
constexpr int64_t kInPlaceMaxK = 1024;
constexpr int64_t kInPlaceL2Panels = 34;
constexpr int64_t kInPlaceManyRowsBytes = int64_t(512) << 10;
constexpr double kInPlaceThreadFlops = 0.2e6;
inline bool in_place_gemm(const GemmParams& p) {
  const int64_t max_bytes =
      cdiv(p.M, MR) <= kInPlaceL2Panels ? caches().l2 : std::min(caches().l2, kInPlaceManyRowsBytes);
  return p.K <= kInPlaceMaxK && (p.M * p.K + p.K * p.N) * int64_t(sizeof(float)) <= max_bytes;
}
void gemm_in_place(const GemmParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K, mp = cdiv(M, MR), np = cdiv(N, NR);
  const float* A = static_cast<const float*>(p.a);
  const float* B = static_cast<const float*>(p.b);
  float* C = static_cast<float*>(p.c);
  // Threads from kInPlaceThreadFlops with 3 row panels per thread or more. Fewer row panels: items that share a row
  // panel's columns, from kFewRowsThreadFlops. Forced avx2 tier, 2 threads,
  // prepared calls, builds alternated twice (us): 8 x 256 x 256 14.0-14.5 -> 8.7, 12 x 256 x 256 18.7-19.5 ->
  // 10.8-11.2, 6 x 256 x 256 8.8-9.0 -> 5.6-5.7, 16 x 128 x 256 12.3-12.4 -> 7.3-7.4, linear 8 x 1024 x 64 20.0-21.5
  // -> 14.5-15.4, 12 x 256 x 256 23.0-23.8 -> 14.1-14.4.
  int nt = mp >= 3 * int64_t(omp_get_max_threads()) ? pick_threads(p, kInPlaceThreadFlops)
                                                       : few_rows_threads(p, mp * np);
  if (p.transb) {  // column panels outer: each item transposes its panel of B, then runs its row panels
    const int64_t nrg = std::min(mp, cdiv(3 * int64_t(nt), np)), items = np * nrg;
    nt = static_cast<int>(std::min<int64_t>(nt, items));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      float* bp = scratch(static_cast<size_t>(K * NR));
      int64_t have = -1;  // the panel in bp (kept while the thread's next item shares it)
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t j = it / nrg, rg = it % nrg;
        const int nc = static_cast<int>(std::min<int64_t>(NR, N - j * NR));
        if (j != have) pack_bt(B + j * NR * K, K, K, nc, bp);
        have = j;
        for (int64_t i = mp * rg / nrg; i < mp * (rg + 1) / nrg; ++i)
          in_place_tiles<true>[std::min<int64_t>(MR, M - i * MR) - 1](A + i * MR * K, K, bp, NR, K,
                                                                       C + i * MR * N + j * NR, N, nc);
      }
    }
    return;
  }
  const int64_t ncg = std::min(np, cdiv(3 * int64_t(nt), mp)), items = mp * ncg;
  nt = static_cast<int>(std::min<int64_t>(nt, items));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / ncg, cg = it % ncg;
    const int64_t R = std::min<int64_t>(MR, M - i * MR);
    for (int64_t j = np * cg / ncg; j < np * (cg + 1) / ncg; ++j) {
      const int nc = static_cast<int>(std::min<int64_t>(NR, N - j * NR));
      (nc == NR ? in_place_tiles<true> : in_place_tiles<false>)[R - 1](A + i * MR * K, K, B + j * NR, N, K,
                                                                       C + i * MR * N + j * NR, N, nc);
    }
  }
}

template <class T> void gemm_typed(const GemmParams& p) {
  if constexpr (std::is_same_v<T, float>)
    if (p.M > kDirectMaxM && in_place_gemm(p) && (!p.transb || p.M > kDotMaxM || p.K <= kInPlaceLinearKPerRow * p.M))
      return gemm_in_place(p);
  if (p.transb) {
    switch (p.M) {
      case 1: return gemm_dot<1, T>(p);
      case 2: return gemm_dot<2, T>(p);
      case 3: return gemm_dot<3, T>(p);
      case 4: return gemm_dot<4, T>(p);
      case 5: return gemm_dot<5, T>(p);
      case 6: return gemm_dot<6, T>(p);
      case 7: return gemm_dot<7, T>(p);
      case 8: return gemm_dot<8, T>(p);
      default: return gemm_packed<T>(p);
    }
  }
  switch (p.M) {
    case 1: return gemm_direct<1, T>(p);
    case 2: return gemm_direct<2, T>(p);
    case 3: return gemm_direct<3, T>(p);
    case 4: return gemm_direct<4, T>(p);
    default: return gemm_packed<T>(p);
  }
}
static_assert(kDirectMaxM == 4, "gemm_typed instantiates the direct path for M = 1..4");

}  // namespace

void gemm_avx2(const GemmParams& p) {
  if (p.dtype == DType::f32) return gemm_typed<float>(p);
  if (p.dtype == DType::bf16) return gemm_typed<u16>(p);
  throw std::invalid_argument(std::string("native cpu gemm does not support dtype ") + dtype_name(p.dtype));
}

}  // namespace pk::cpu

#else  // not x86-64: the tier does not exist (isa_supported(avx2) is false), so this is never called

#include <stdexcept>

namespace pk::cpu {
void gemm_avx2(const GemmParams&) { throw std::logic_error("the AVX2 tier exists only on x86-64"); }
}  // namespace pk::cpu
#endif
