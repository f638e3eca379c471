// AMX bf16 GEMM (Sapphire Rapids and later): C[M,N] = A[M,K] . B, with B stored [K, N] or, for
// linear layers (GemmParams::transb), [N, K]; bf16 in and out, fp32 accumulation in the tiles, the
// result rounded to nearest even once at the end (as float_to_bf16 in scalar.h).
//
// Tiles: the 8 AMX tile registers all hold 16 rows x 64 bytes. One step of the inner loop takes
// 32 values of K: A tiles tmm4 (rows 0-15) and tmm5 (rows 16-31) are 16 rows x 32 bf16, loaded
// straight from row-major A; B tiles tmm6 (columns 0-15) and tmm7 (16-31) hold 16 K-pairs x 16
// columns in the pair-interleaved ("VNNI") order tdpbf16ps wants, from B packed once per call; the
// four tdpbf16ps update a 32 x 32 fp32 block of C held in tmm0-3 (2 x 2 tiles, the blocking oneDNN
// also uses for bf16: each loaded tile feeds two tdpbf16ps).
//
// Blocking, from the cache sizes the CPU reports (caches()):
//   KC  K values per block: a 32-row slice of A (32 x KC bf16) stays in L1d while it meets every
//       32-column panel of the item's B block;
//   NB  columns per work item: the item's B block for one K block (KC x NB bf16) stays in L2 while
//       the item's row slices pass over it;
//   MB  rows per work item: the item's fp32 accumulator (MB x NB) stays in L2 too.
// Work items (MB x NB blocks of C) are handed out dynamically after all threads have packed B.
// Rows of A past M and K past K are never read: such slices are copied into a zero-padded scratch.
// Built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt); called only when features() has
// amx_bf16 (CPUID + the OS's tile-data permission) and the active tier is "amx".
#include "cpu/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "cpu/vec.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using u32 = uint32_t;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch kept per thread between calls (a fresh 8 MB buffer per call costs ~2000 page faults).
class Keep {
 public:
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(p_);
      cap_ = (bytes + 4095) / 4096 * 4096;
      p_ = std::aligned_alloc(64, cap_);
      if (!p_) {
        cap_ = 0;
        throw std::bad_alloc();
      }
    }
    return p_;
  }
  ~Keep() { std::free(p_); }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};
// Larger needs are allocated for the call and freed.
constexpr size_t kKeepMax = size_t(64) << 20;

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}

// Packed B: for each 32-column panel jp and each 32-deep K tile kt, two 1 KB tiles (columns 0-15,
// 16-31 of the panel), tile element [r][c][e] = B[32 kt + 2 r + e][32 jp + 16 h + c], zero outside.
constexpr int64_t kTileU16 = 512;  // 16 rows x 32 bf16

// One panel of B stored [K, N] (row stride N).
void pack_panel_kn(const u16* B, int64_t K, int64_t N, int64_t jp, int64_t Kt, u16* dst) {
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = jp * 32 + h * 16, nc = std::min<int64_t>(16, N - n0);
    const __mmask16 m = vec::mask16(nc);
    for (int64_t kt = 0; kt < Kt; ++kt) {
      u16* t = dst + (kt * 2 + h) * kTileU16;
      for (int r = 0; r < 16; ++r) {
        const int64_t k = kt * 32 + 2 * r;
        const __m256i z = _mm256_setzero_si256();
        const __m256i lo = (nc > 0 && k < K) ? _mm256_maskz_loadu_epi16(m, B + k * N + n0) : z;
        const __m256i hi = (nc > 0 && k + 1 < K) ? _mm256_maskz_loadu_epi16(m, B + (k + 1) * N + n0) : z;
        const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        _mm512_store_si512(t + r * 32, w);
      }
    }
  }
}

// 16 x 16 transpose of 32-bit words, in place.
inline void transpose16(__m512i v[16]) {
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

// One panel of B stored [N, K] (row stride K): a K-pair of column n is one 32-bit word of row n,
// so each tile is a 16 x 16 transpose of words.
void pack_panel_nk(const u16* W, int64_t K, int64_t N, int64_t jp, int64_t Kt, u16* dst) {
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = jp * 32 + h * 16;
    for (int64_t kt = 0; kt < Kt; ++kt) {
      const __mmask32 m = vec::mask32(K - kt * 32);
      __m512i v[16];
      for (int c = 0; c < 16; ++c)
        v[c] = n0 + c < N ? _mm512_maskz_loadu_epi16(m, W + (n0 + c) * K + kt * 32) : _mm512_setzero_si512();
      transpose16(v);
      u16* t = dst + (kt * 2 + h) * kTileU16;
      for (int r = 0; r < 16; ++r) _mm512_store_si512(t + r * 32, v[r]);
    }
  }
}

struct Blocking {
  int64_t kct;  // K tiles (32 values each) per K block
  int64_t nb;   // columns per item (multiple of 32)
  int64_t mb;   // rows per item (multiple of 32)
};

Blocking blocking(int64_t M, int64_t N, int64_t Kt, int nt) {
  const Caches& c = caches();
  Blocking b;
  // A slice: 32 rows x 32 kct bf16 = 2 KB per K tile, half of L1d.
  b.kct = std::clamp<int64_t>(c.l1d / 2 / 2048, 4, 32);
  b.kct = std::min(b.kct, Kt);
  // B block of an item: kct x nb bf16 = 2 KB per (K tile, 32 columns): a quarter of L2.
  b.nb = std::clamp<int64_t>(c.l2 / 4 / (b.kct * 2048) * 32, 64, 1024);
  // fp32 accumulator mb x nb: a quarter of L2.
  b.mb = std::clamp<int64_t>(c.l2 / 4 / (b.nb * 4) / 32 * 32, 32, 512);
  b.nb = std::min(b.nb, cdiv(N, 32) * 32);
  b.mb = std::min(b.mb, cdiv(M, 32) * 32);
  // Enough items for the threads to share (4 each), splitting columns first, then rows.
  auto items = [&] { return cdiv(M, b.mb) * cdiv(N, b.nb); };
  while (items() < 4 * nt && b.nb > 64) b.nb = cdiv(b.nb / 2, 32) * 32;
  while (items() < 4 * nt && b.mb > 32) b.mb = cdiv(b.mb / 2, 32) * 32;
  return b;
}

// C block (rows [r0, r0 + mrows), columns [c0, c0 + ncols)) of the item, from its fp32 accumulator.
void store_block(const float* acc, int64_t ld, int64_t mrows, int64_t ncols, u16* C, int64_t N) {
  for (int64_t r = 0; r < mrows; ++r)
    for (int64_t j = 0; j < ncols; j += 16)
      vec::store_bf16(C + r * N + j, _mm512_loadu_ps(acc + r * ld + j), ncols - j);
}

struct Shared {
  const u16* A;
  u16* C;
  const u16* Bp;
  int64_t M, N, K, Kt, Np;
  Blocking blk;
  std::atomic<int64_t> next{0};
};

// One item: rows [m0, m0 + mb) x panels [p0, p1) of C.
void run_item(Shared& s, int64_t m0, int64_t p0, int64_t p1, Keep& keep) {
  const int64_t M = s.M, N = s.N, K = s.K, Kt = s.Kt, kct = s.blk.kct;
  const int64_t rows = std::min(s.blk.mb, M - m0), slices = cdiv(rows, 32), ldacc = (p1 - p0) * 32;
  // Accumulator (slices*32 x ldacc fp32), then the A scratch (32 x kct*32 bf16).
  const size_t acc_bytes = size_t(slices) * 32 * ldacc * 4;
  char* mem = static_cast<char*>(keep.get(acc_bytes + size_t(32) * kct * 64));
  float* acc = reinterpret_cast<float*>(mem);
  u16* ascratch = reinterpret_cast<u16*>(mem + acc_bytes);
  const bool k_full = K % 32 == 0;
  for (int64_t kt0 = 0; kt0 < Kt; kt0 += kct) {
    const int64_t kt1 = std::min(Kt, kt0 + kct), nk = kt1 - kt0;
    for (int64_t i = 0; i < slices; ++i) {
      const int64_t r0 = m0 + i * 32, nr = std::min<int64_t>(32, M - r0);
      const u16* a;
      int64_t lda_bytes;
      if (nr == 32 && (k_full || kt1 < Kt)) {
        a = s.A + r0 * K + kt0 * 32;
        lda_bytes = K * 2;
      } else {  // rows past M or K past K: a zero-padded copy
        const int64_t kv = std::min(K, kt1 * 32) - kt0 * 32;
        for (int64_t r = 0; r < 32; ++r) {
          u16* d = ascratch + r * nk * 32;
          std::memset(d, 0, size_t(nk) * 64);
          if (r < nr) std::memcpy(d, s.A + (r0 + r) * K + kt0 * 32, size_t(kv) * 2);
        }
        a = ascratch;
        lda_bytes = nk * 64;
      }
      const int64_t a_step = lda_bytes / 2 * 16;  // 16 rows down, in u16
      for (int64_t jp = p0; jp < p1; ++jp) {
        float* c = acc + i * 32 * ldacc + (jp - p0) * 32;
        const int64_t ldc = ldacc * 4;
        if (kt0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, ldc);
          _tile_loadd(1, c + 16, ldc);
          _tile_loadd(2, c + 16 * ldacc, ldc);
          _tile_loadd(3, c + 16 * ldacc + 16, ldc);
        }
        const u16* b = s.Bp + (jp * Kt + kt0) * 2 * kTileU16;
        const u16* ak = a;
        for (int64_t kt = 0; kt < nk; ++kt) {
          _tile_loadd(4, ak, lda_bytes);
          _tile_loadd(6, b, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, b + kTileU16, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(5, ak + a_step, lda_bytes);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
          ak += 32;
          b += 2 * kTileU16;
        }
        _tile_stored(0, c, ldc);
        _tile_stored(1, c + 16, ldc);
        _tile_stored(2, c + 16 * ldacc, ldc);
        _tile_stored(3, c + 16 * ldacc + 16, ldc);
        if (kt1 == Kt) {
          const int64_t c0 = jp * 32;
          store_block(c, ldacc, nr, std::min<int64_t>(32, N - c0), s.C + r0 * N + c0, N);
        }
      }
    }
  }
}

}  // namespace

void gemm_amx(const GemmParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K, Kt = cdiv(K, 32), Np = cdiv(N, 32);
  const double flops = 2.0 * double(M) * double(N) * double(K);
  const int nt = flops < 4.0e6 ? 1 : std::max(1, omp_get_max_threads());
  Shared s;
  s.A = static_cast<const u16*>(p.a);
  s.C = static_cast<u16*>(p.c);
  s.M = M, s.N = N, s.K = K, s.Kt = Kt, s.Np = Np;
  s.blk = blocking(M, N, Kt, nt);
  const size_t bp_bytes = size_t(Np) * Kt * 2 * kTileU16 * 2;
  thread_local Keep bkeep;
  std::unique_ptr<void, decltype(&std::free)> big(nullptr, &std::free);
  void* bp;
  if (bp_bytes > kKeepMax) {
    big.reset(std::aligned_alloc(64, (bp_bytes + 63) / 64 * 64));
    if (!big) throw std::bad_alloc();
    bp = big.get();
  } else {
    bp = bkeep.get(bp_bytes);
  }
  s.Bp = static_cast<const u16*>(bp);
  const int64_t pp = s.blk.nb / 32, col_items = cdiv(Np, pp), items = cdiv(M, s.blk.mb) * col_items;
  const u16* B = static_cast<const u16*>(p.b);
  u16* Bp = static_cast<u16*>(bp);
  const bool transb = p.transb;
  auto body = [&](int t, int n) {
    configure_tiles();
    for (int64_t jp = t; jp < Np; jp += n) {
      u16* dst = Bp + jp * Kt * 2 * kTileU16;
      if (transb) pack_panel_nk(B, K, N, jp, Kt, dst);
      else pack_panel_kn(B, K, N, jp, Kt, dst);
    }
  };
  auto work = [&]() {
    thread_local Keep keep;
    for (int64_t it; (it = s.next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t mi = it / col_items, ci = it % col_items;
      run_item(s, mi * s.blk.mb, ci * pp, std::min(Np, (ci + 1) * pp), keep);
    }
    _tile_release();
  };
  if (nt == 1 || omp_in_parallel()) {
    body(0, 1);
    work();
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    body(omp_get_thread_num(), omp_get_num_threads());
#pragma omp barrier
    work();
  }
}

}  // namespace pk::cpu
#else  // not x86: no AMX; enabled().amx_bf16 is never true there

#include <stdexcept>

namespace pk::cpu {
void gemm_amx(const GemmParams&) { throw std::logic_error("gemm_amx: AMX exists only on x86-64"); }
}  // namespace pk::cpu
#endif
