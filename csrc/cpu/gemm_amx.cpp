// AMX bf16 GEMM (Sapphire Rapids and later): C[M,N] = A[M,K] . B, with B stored [K, N] or, for
// linear layers (GemmParams::transb), [N, K]; bf16 in and out, fp32 accumulation in the tiles, the
// result rounded to nearest even once at the end (as float_to_bf16 in scalar.h).
//
// Tiles: the 8 AMX tile registers all hold 16 rows x 64 bytes. One step of the inner loop takes
// 32 values of K: A tiles tmm4 (rows 0-15) and tmm5 (rows 16-31) are 16 rows x 32 bf16 from A packed
// once per call; B tiles tmm6 (columns 0-15) and tmm7 (16-31) hold 16 K-pairs x 16
// columns in the pair-interleaved ("VNNI") order tdpbf16ps wants, from B packed once per call; the
// four tdpbf16ps update a 32 x 32 fp32 block of C held in tmm0-3 (2 x 2 tiles, the blocking oneDNN
// also uses for bf16: each loaded tile feeds two tdpbf16ps).
//
// Blocking, from the cache sizes the CPU reports (caches(); see blocking()):
//   K blocks small enough that a 32-row A slice of the block takes a third of L1d (256 values on a
//   48 KB L1d): the slice stays in L1d while it meets every B panel of the item, whose tiles stream
//   from L2; the C tiles go through an fp32 accumulator per K block (notes/cpu_gemm.md);
//   NB columns per work item: the item's B block for one K block takes an eighth of L2, MB rows (256)
//   so that the item's accumulator takes a quarter; each B block fetched from L3 feeds MB / 32 slices.
//   The next A slice (into L1d) and the next K block's B block (into L2) are prefetched in shares.
// A is packed once per call into tiles; B too when several row blocks share it, by all threads, before
// the items (MB x NB blocks of C, handed out dynamically). With one row block (small M) each item packs
// its own B block into L2 as it goes (B read once, never written back). Padding past M, N and K is zero.
// Built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt); called only when features() has
// amx_bf16 (CPUID + the OS's tile-data permission) and the active tier is "amx".
#include "cpu/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/amx_common.h"
#include "cpu/team.h"
#include "cpu/vec.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using amx::configure_tiles;
using amx::transpose16;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls on one thread while another process holds a core (team.h).
team::SoloState g_solo_amx;

// Packed B: for each 32-column panel jp and each 32-deep K tile kt, two 1 KB tiles (columns 0-15,
// 16-31 of the panel), tile element [r][c][e] = B[32 kt + 2 r + e][32 jp + 16 h + c], zero outside.
// Ordered by K block, then panel, then K tile: what one K block of an item reads, panel after panel,
// is one contiguous run (the L2 streamer runs ahead on it).
constexpr int64_t kTileU16 = 512;  // 16 rows x 32 bf16

// Offset (u16) of the tile pair (jp, kt) in packed B, with K blocks of kct tiles.
inline int64_t b_at(int64_t jp, int64_t kt, int64_t Np, int64_t Kt, int64_t kct) {
  const int64_t kt0 = kt / kct * kct, nk = std::min(kct, Kt - kt0);
  return (kt0 * Np + jp * nk + (kt - kt0)) * 2 * kTileU16;
}

// K tile kt of B stored [K, N] (row stride N), panels [jp0, jp1); off(jp, kt) = where the tile pair goes
// (u16 from dst). Rows are read front to back (two rows at a time, interleaved into K pairs) and each
// 64-byte tile row is written whole. (Walking a panel down K instead would step 2N bytes per row: a new
// page every row at N = 2048, measured 3x slower.)
template <class Off>
void pack_kn(const u16* B, int64_t K, int64_t N, int64_t kt, int64_t jp0, int64_t jp1, Off off, u16* dst) {
  for (int r = 0; r < 16; ++r) {
    const int64_t k = kt * 32 + 2 * r;
    const u16* row0 = k < K ? B + k * N : nullptr;
    const u16* row1 = k + 1 < K ? B + (k + 1) * N : nullptr;
    for (int64_t jp = jp0; jp < jp1; ++jp) {
      u16* t = dst + off(jp, kt) + r * 32;
      for (int h = 0; h < 2; ++h) {
        const int64_t n0 = jp * 32 + h * 16;
        const __mmask16 m = vec::mask16(N - n0);
        const __m256i z = _mm256_setzero_si256();
        const __m256i lo = row0 ? _mm256_maskz_loadu_epi16(m, row0 + n0) : z;
        const __m256i hi = row1 ? _mm256_maskz_loadu_epi16(m, row1 + n0) : z;
        _mm512_store_si512(t + h * kTileU16, vec::pair_bf16(lo, hi));
      }
    }
  }
}

// Panel jp of B stored [N, K] (row stride K), K tiles [kt0, kt1): a K-pair of column n is one 32-bit
// word of row n, so each tile is a 16 x 16 transpose of words.
template <class Off>
void pack_nk(const u16* W, int64_t K, int64_t N, int64_t jp, int64_t kt0, int64_t kt1, Off off, u16* dst) {
  for (int h = 0; h < 2; ++h) {
    const int64_t n0 = jp * 32 + h * 16;
    for (int64_t kt = kt0; kt < kt1; ++kt) {
      const __mmask32 m = vec::mask32(K - kt * 32);
      __m512i v[16];
      for (int c = 0; c < 16; ++c)
        v[c] = n0 + c < N ? _mm512_maskz_loadu_epi16(m, W + (n0 + c) * K + kt * 32) : _mm512_setzero_si512();
      transpose16(v);
      u16* t = dst + off(jp, kt) + h * kTileU16;
      for (int r = 0; r < 16; ++r) _mm512_store_si512(t + r * 32, v[r]);
    }
  }
}

// Packed A: for each 32-row slice i and K tile kt in [kt0, kt1), two 1 KB tiles (rows 0-15, 16-31 of the slice), row r
// of a tile = A[32 i + 16 h + r][32 kt .. 32 kt + 31], zero past M and K. Loading A tiles in place from
// row-major A puts the 16 rows of a tile 2K bytes apart: at K = 2048 all in one L1d set (4 KB aliasing).
// Measured on one Sapphire Rapids core at 2048^3: in place 14.1 ms of tile work + 1.1 ms packing B;
// packed 12.6 + 1.9 ms.
void pack_slice_a(const u16* A, int64_t M, int64_t K, int64_t i, int64_t kt0, int64_t kt1, u16* dst) {
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const __mmask32 m = vec::mask32(K - kt * 32);
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t row = i * 32 + r;
      const __m512i v = row < M ? _mm512_maskz_loadu_epi16(m, A + row * K + kt * 32) : _mm512_setzero_si512();
      _mm512_store_si512(dst + ((kt - kt0) * 2 + r / 16) * kTileU16 + (r % 16) * 32, v);
    }
  }
}

struct Blocking {
  int64_t kct;  // K tiles (32 values each) per K block
  int64_t nb;   // columns per item (multiple of 32)
  int64_t mb;   // rows per item (multiple of 32)
};

Blocking blocking(int64_t M, int64_t N, int64_t Kt, int nt, bool transb) {
  const Caches& c = caches();
  Blocking b;
  // K block: the 32-row A slice of one K block (2 KB per K tile) takes a third of L1d, so that it and
  // the next slice (prefetched while this one runs) stay there while the B tiles stream from L2: 8 K
  // tiles (256 values) on a 48 KB L1d. Each block goes through the fp32 accumulator (a tile load and
  // store per 32 tdpbf16ps). Measured on one Sapphire Rapids core, 2048^3: K blocks of 2048 values kept
  // in the tiles (A slice and B panel both from L2) 13.5 ms of tile work, 256-value blocks with the
  // prefetches 11.6 ms; 384 / 512 values 14.5 / 18.3 ms (the two slices no longer fit L1d).
  b.kct = std::clamp<int64_t>(c.l1d / 3 / 2048, 2, 64);
  // Item's B block (kct x nb bf16, 2 KB per K tile and 32 columns), an eighth of L2 (the next K block's
  // is prefetched into L2 beside it), and its fp32 accumulator (mb x nb), a quarter: 2 MB L2 -> 512
  // columns x 256 rows; each B block fetched from L3 feeds mb / 32 slices.
  b.nb = std::clamp<int64_t>(c.l2 / 8 / (b.kct * 2048) * 32, 64, 1024);
  b.mb = std::clamp<int64_t>(c.l2 / 4 / (b.nb * 4) / 32 * 32, 32, 512);
  b.kct = std::min(b.kct, Kt);
  b.nb = std::min(b.nb, cdiv(N, 32) * 32);
  b.mb = std::min(b.mb, cdiv(M, 32) * 32);
  if (!transb && M <= std::min<int64_t>(b.mb, 128) && N >= 64 * nt) {
    // One row block of at most 128 rows (small M: each B block is read once, packed by its item, local_b;
    // the fp32 accumulator of several K blocks, M x nb, stays <= 1 MB). Wide column blocks,
    // two per thread, so that the item reads B [K, N] in long runs of its rows (256 columns = 512 bytes
    // of each row at N = 4096 meant a new page every row: 2.4 ms for M = 32, N = K = 4096, against 1.6
    // ms from B stored [N, K]); K blocks then shrink so that the packed block takes a quarter of L2
    // (the rows of B being packed pass through L2 beside it): with half of L2, M = 40 / 64 / 96 / 128,
    // N = K = 4096 took 1.99-2.03 / 2.16-2.33 / 2.76-2.79 / 3.23-3.44 ms, with a quarter 1.66-1.72 /
    // 1.82-1.90 / 2.26-2.39 / 2.66-2.70 (torch 1.64-1.71 / 1.99-2.03 / 2.32-2.47 / 2.80-2.87; an eighth or a
    // sixteenth the same, a prefetch of the next block's rows 40% slower). (B stored [N, K] reads whole
    // K runs of its rows either way; wide blocks measured slower there.)
    b.nb = std::min<int64_t>(cdiv(cdiv(N, 2 * nt), 32) * 32, 4096);
    b.kct = std::clamp<int64_t>(c.l2 / 4 / (b.nb / 32 * 2048), 4, 64);
    b.kct = std::min(b.kct, Kt);
    return b;
  }
  if (transb && M <= 32) {
    // One slice of rows, B stored [N, K] (a linear layer's weight, read once; each item packs its own
    // block): long K runs of each weight row (up to 2048 values, 4 KB) and blocks of an eighth of L2, 64
    // items at N = K = 4096. With the L1d-sized K blocks (256 values: 512-byte runs of every row) bf16
    // M = 12 / 16 / 32 took 1.39 / 1.37 / 1.42 ms against torch's 1.16 / 1.18 / 1.44; now 1.16 / 1.17 /
    // 1.30 (2 threads, Sapphire Rapids VM). From M = 64 the L1d-sized blocks were as fast or faster (M =
    // 128: 2.51 against 2.97 ms).
    b.kct = std::min<int64_t>(Kt, 64);
    b.nb = std::min(std::clamp<int64_t>(c.l2 / 8 / (b.kct * 2048) * 32, 32, 1024), cdiv(N, 32) * 32);
    return b;
  }
  // Enough items for the threads to share (4 each), splitting rows first (B blocks stay large), then columns.
  auto items = [&] { return cdiv(M, b.mb) * cdiv(N, b.nb); };
  while (items() < 4 * nt && b.mb > 128) b.mb = cdiv(b.mb / 2, 32) * 32;
  while (items() < 4 * nt && b.nb > 64) b.nb = cdiv(b.nb / 2, 32) * 32;
  return b;
}

// 32 x ncols (<= 32) fp32 block at acc (row stride ld) -> the first mrows rows of C (bf16, stride N).
void store_block(const float* acc, int64_t ld, int64_t mrows, int64_t ncols, u16* C, int64_t N) {
  for (int64_t r = 0; r < mrows; ++r)
    for (int64_t j = 0; j < ncols; j += 16)
      vec::store_bf16(C + r * N + j, _mm512_loadu_ps(acc + r * ld + j), ncols - j);
}

struct Shared {
  const u16* A;
  u16* C;
  const u16* Ap;  // packed A (pack_slice_a)
  const u16* Bp;  // packed B (pack_kn / pack_nk), or nullptr: each item packs its own block (local_b)
  const u16* B;
  bool transb, local_b;
  int64_t M, N, K, Kt, Np;
  Blocking blk;
};

// Lines [from, to) of the block at p, to fetch while a (slice, panel) step of nk K tiles runs: `per`
// lines before each K tile (tile_steps).
struct Share {
  const char* p = nullptr;
  int64_t from = 0, to = 0, per = 0;
  Share() = default;
  Share(const void* block, int64_t lines, int64_t f, int64_t t, int64_t nk)
      : p(static_cast<const char*>(block)), from(f), to(block ? std::max(f, std::min(lines, t)) : f),
        per((to - from + nk - 1) / nk) {}
  template <int Hint> inline void fetch(int64_t kt) const {
    const int64_t l0 = from + kt * per, l1 = std::min(to, l0 + per);
    for (int64_t l = l0; l < l1; ++l) _mm_prefetch(p + l * 64, static_cast<_mm_hint>(Hint));
  }
};

// The four C tiles (tmm0-3) hold a 32 x 32 fp32 block; in memory it is 32 rows of 128 bytes. Half: rows
// 16-31 are padding (M <= 16) and their tiles are neither loaded, computed nor stored.
template <bool Half = false> inline void load_c(const float* c) {
  _tile_loadd(0, c, 128);
  _tile_loadd(1, c + 16, 128);
  if constexpr (!Half) {
    _tile_loadd(2, c + 16 * 32, 128);
    _tile_loadd(3, c + 16 * 32 + 16, 128);
  }
}
template <bool Half = false> inline void store_c(float* c) {
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if constexpr (!Half) {
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}
inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// C tiles += nk K tiles of a packed A slice (a: two tiles per K tile) times a packed B panel (b: two
// tiles per K tile); each loaded tile feeds two tdpbf16ps. pa / pb: lines to prefetch into L1d / L2
// meanwhile, a part before each K tile. (One burst of them before the tiles, 48 lines per step at 2048^3,
// filled the fill buffers and stalled the tile loads behind them: perf put ~20% of run_item's samples on
// the prefetch loops. Spread, Sapphire Rapids VM, scratch driver alternating the two builds: 2048^3 on one
// thread 15.6-16.4 -> 15.0-16.0 ms (4 of 5 pairs faster), 2 threads 7.5-7.8 -> 7.3-7.7 ms (4 of 4);
// 256 x 4096 x 4096 4.5-4.7 -> 4.5-4.6 ms.)
template <bool Half = false>
inline void tile_steps(const u16* a, const u16* b, int64_t nk, const Share& pa = {}, const Share& pb = {}) {
  for (int64_t kt = 0; kt < nk; ++kt) {
    pa.fetch<_MM_HINT_T0>(kt);
    pb.fetch<_MM_HINT_T1>(kt);
    _tile_loadd(4, a, 64);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + kTileU16, 64);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (!Half) {
      _tile_loadd(5, a + kTileU16, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    a += 2 * kTileU16;
    b += 2 * kTileU16;
  }
}

// One item: rows [m0, m0 + mb) x panels [p0, p1) of C.
void run_item(const Shared& s, int64_t m0, int64_t p0, int64_t p1, Keep& keep) {
  const int64_t M = s.M, N = s.N, Kt = s.Kt, kct = s.blk.kct, np = p1 - p0;
  const int64_t rows = std::min(s.blk.mb, M - m0), slices = cdiv(rows, 32);
  // One K block: the C tiles go through a 32 x 32 scratch (L1) to C. Several: an fp32 accumulator for
  // the item, one 32 x 32 block (4 KB) per (slice, panel), stored and reloaded per K block. (A row-major
  // accumulator put the 16 rows of a C tile 2 KB apart: two L1d sets.)
  const bool one_block = kct >= Kt;
  const size_t acc_bytes = size_t(one_block ? 1 : slices * np) * 32 * 32 * 4;
  char* mem = static_cast<char*>(keep.get(acc_bytes + (s.local_b ? size_t(np) * kct * 2 * kTileU16 * 2 : 0)));
  float* acc = reinterpret_cast<float*>(mem);
  u16* bl = reinterpret_cast<u16*>(mem + acc_bytes);  // this item's B block (local_b)
  auto slice_a = [&](int64_t i, int64_t kt) { return s.Ap + ((m0 / 32 + i) * Kt + kt) * 2 * kTileU16; };
  for (int64_t kt0 = 0; kt0 < Kt; kt0 += kct) {
    const int64_t kt1 = std::min(Kt, kt0 + kct), nk = kt1 - kt0, nk_next = std::min(kct, Kt - kt1);
    auto local = [&](int64_t jp, int64_t kt) { return ((jp - p0) * nk + (kt - kt0)) * 2 * kTileU16; };
    if (s.local_b) {  // one row block: this item is the only reader of its B block, packed into L2 right here
      if (s.transb) {
        for (int64_t jp = p0; jp < p1; ++jp) pack_nk(s.B, s.K, N, jp, kt0, kt1, local, bl);
      } else {
        for (int64_t kt = kt0; kt < kt1; ++kt) pack_kn(s.B, s.K, N, kt, p0, p1, local, bl);
      }
    }
    // Software prefetches, spread over the (slice, panel) steps and within each over its K tiles: the next
    // A slice into L1d (a share per panel) and the next K block's B block into L2 (a share per step). The
    // hardware prefetchers left the first panel of every slice and the first slice of every K block
    // waiting on L3 / memory.
    const u16* b_next = nk_next > 0 && !s.local_b ? s.Bp + b_at(p0, kt1, s.Np, Kt, kct) : nullptr;
    const int64_t b_lines = np * nk_next * 32, b_share = cdiv(b_lines, slices * np);
    for (int64_t i = 0; i < slices; ++i) {
      const int64_t r0 = m0 + i * 32, nr = std::min<int64_t>(32, M - r0);
      const u16* a = slice_a(i, kt0);
      const u16* a_next = i + 1 < slices ? slice_a(i + 1, kt0) : nk_next > 0 ? slice_a(0, kt1) : nullptr;
      const int64_t a_lines = (i + 1 < slices ? nk : nk_next) * 32, a_share = cdiv(a_lines, np);
      for (int64_t jp = p0; jp < p1; ++jp) {
        const int64_t step = i * np + (jp - p0);
        const Share pa(a_next, a_lines, (jp - p0) * a_share, (jp - p0 + 1) * a_share, nk);
        const Share pb(b_next, b_lines, step * b_share, (step + 1) * b_share, nk);
        float* c = one_block ? acc : acc + step * 32 * 32;
        if (kt0 == 0) {
          zero_c();
        } else {
          load_c(c);
        }
        tile_steps(a, s.local_b ? bl + local(jp, kt0) : s.Bp + b_at(jp, kt0, s.Np, Kt, kct), nk, pa, pb);
        store_c(c);
        if (kt1 == Kt) {
          const int64_t c0 = jp * 32;
          store_block(c, 32, nr, std::min<int64_t>(32, N - c0), s.C + r0 * N + c0, N);
        }
      }
    }
  }
}

// At most one slice of rows (M <= 32) with B stored [K, N]: the threads split K, not N. Items are chunks
// of K tiles; the item packs its rows of B (whole rows: 8 KB runs at N = 4096, where column blocks of
// 1024 read 2 KB runs of every row, one stream start per page) and adds the product to the thread's
// fp32 partial of C; the partials are summed into C at the end, each thread a share of the panels.
// M = 16, N = K = 4096 on 2 threads (Sapphire Rapids VM, torch.matmul in turns): column blocks 1.76-1.84
// ms, K chunks 1.55 ms, torch 1.58-1.63; M = 32 the same either way (1.78-1.83 ms, torch 1.58-1.61).
void gemm_amx_ksplit(const GemmParams& p, int nt) {
  const int64_t M = p.M, N = p.N, K = p.K, Kt = cdiv(K, 32), Np = cdiv(N, 32);
  const u16* A = static_cast<const u16*>(p.a);
  const u16* B = static_cast<const u16*>(p.b);
  u16* C = static_cast<u16*>(p.c);
  // K tiles per chunk: the packed chunk (2 KB per panel and K tile) in half of L2.
  const int64_t kcc = std::clamp<int64_t>(caches().l2 / 2 / (Np * 2 * kTileU16 * 2), 1, 64);
  const int64_t items = cdiv(Kt, kcc);
  nt = static_cast<int>(std::min<int64_t>(nt, items));
  const size_t part = size_t(Np) * 32 * 32;                              // floats of one thread's partial
  const size_t per_thread = size_t(kcc) * 2 * kTileU16 * (Np + 1);        // u16: packed B chunk + A slice
  thread_local Keep bkeep;
  const CallBuffer buf(bkeep, nt * (part * 4 + per_thread * 2) + nt);
  float* parts = buf.as<float>();
  u16* packs = reinterpret_cast<u16*>(parts + nt * part);
  bool* used = reinterpret_cast<bool*>(packs + nt * per_thread);  // thread t added at least one chunk
  const bool half = M <= 16;  // rows 16-31 of the slice are padding: skip their tdpbf16ps
  team::ContentionGuard guard(g_solo_amx, nt);
  team::run_team(guard.threads(), [&](int t, int nth, team::Team& tm) {
    configure_tiles();
    float* acc = parts + t * part;
    u16* bl = packs + t * per_thread;
    u16* al = bl + size_t(kcc) * Np * 2 * kTileU16;
    used[t] = false;
    for (int64_t it; (it = tm.grab()) < items;) {
      const int64_t kt0 = it * kcc, kt1 = std::min(Kt, kt0 + kcc), nk = kt1 - kt0;
      auto local = [&](int64_t jp, int64_t kt) { return (jp * nk + (kt - kt0)) * 2 * kTileU16; };
      for (int64_t kt = kt0; kt < kt1; ++kt) pack_kn(B, K, N, kt, 0, Np, local, bl);
      pack_slice_a(A, M, K, 0, kt0, kt1, al);
      for (int64_t jp = 0; jp < Np; ++jp) {
        float* c = acc + jp * 32 * 32;
        const u16* b = bl + local(jp, kt0);
        if (!used[t]) {
          zero_c();
        } else if (half) {
          load_c<true>(c);
        } else {
          load_c(c);
        }
        if (half) {
          tile_steps<true>(al, b, nk);
          store_c<true>(c);
        } else {
          tile_steps(al, b, nk);
          store_c(c);
        }
      }
      used[t] = true;
    }
    guard.barrier(tm, t);  // every partial complete (the barrier publishes them)
    // Sum the partials of the threads that added chunks into C, a share of the panels per thread.
    const int64_t j0 = Np * t / nth, j1 = Np * (t + 1) / nth;
    for (int64_t jp = j0; jp < j1; ++jp) {
      const int64_t c0 = jp * 32, nc = std::min<int64_t>(32, N - c0);
      for (int64_t r = 0; r < M; ++r) {
        for (int64_t j = 0; j < nc; j += 16) {
          __m512 sum = _mm512_setzero_ps();
          for (int u = 0; u < nth; ++u)
            if (used[u]) sum = _mm512_add_ps(sum, _mm512_loadu_ps(parts + u * part + jp * 1024 + r * 32 + j));
          vec::store_bf16(C + r * N + c0 + j, sum, nc - j);
        }
      }
    }
    _tile_release();
    guard.body_done(t);
  });
}

}  // namespace

// Threads from these many FLOPs. On two threads the items read tiles of A (and of B when it is packed once for all
// items) that the other thread packed, written in its core's caches; below these sizes that cost more than the
// second thread saved. Sapphire Rapids VM, prepared calls in a loop, 1 / 2 threads (us):
// - one row block (B [K, N] packed by each item as it goes, or M <= 32 split along K, gemm_amx_ksplit): 128^3 6.9 /
//   12.3, 128 x 256 x 256 19.4 / 27.1, 32 x 512 x 512 35.4 / 40.2, 16 x 1024 x 512 68.9 / 90.3, 64 x 512 x 256 23.9 /
//   23.0, 96 x 512 x 128 17.3 / 16.9; but 48 x 512 x 512 (25 MFLOP) 46.9 / 38.3, 64 x 1024 x 256 57.3 / 33.5;
// - linear (B [N, K]) of up to 32 rows (each item packs its own weight rows): 16 x 1024 x 512 59.2 / 38.9, 32 x 512
//   x 512 33.7 / 29.3 (from 4 MFLOP, as before); linear of more rows as the GEMMs: 128^3 6.6 / 11.8, 128 x 256 x 256
//   20.5 / 27.9, 64 x 512 x 256 22.9 / 24.1;
// - several row blocks (A and B packed once for all items, kAmxSharedThreadFlops): 160^3 11.5 / 21.3, 192^3 18.8 /
//   30.7, 224^3 30.2 / 39.0, 256 x 256 x 128 25.4 / 30.2, 256^3 43.8 / 47.9; 288^3 65.9 / 58.5, 320^3 93 / 84, 384^3
//   125 / 103, 192 x 192 x 2048 245 / 209; between them 200 x 300 x 400 (48 MFLOP) 63.2 / 73.6.
constexpr double kAmxThreadFlops = 20.0e6;
constexpr double kAmxLinearThreadFlops = 4.0e6;
constexpr double kAmxSharedThreadFlops = 40.0e6;

void gemm_amx(const GemmParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K, Kt = cdiv(K, 32), Np = cdiv(N, 32), Ms = cdiv(M, 32);
  const double flops = 2.0 * double(M) * double(N) * double(K);
  // linear of up to 32 rows: each item packs its own block of weight rows, read once (see blocking())
  const bool small_linear = p.transb && M <= 32;
  int nt = flops < (small_linear ? kAmxLinearThreadFlops : kAmxThreadFlops) ? 1 : std::max(1, omp_get_max_threads());
  Shared s;
  s.A = static_cast<const u16*>(p.a);
  s.C = static_cast<u16*>(p.c);
  s.M = M, s.N = N, s.K = K, s.Kt = Kt, s.Np = Np;
  if (!p.transb && M <= 32 && nt > 1) return gemm_amx_ksplit(p, nt);
  s.blk = blocking(M, N, Kt, nt, p.transb);
  if (nt > 1 && cdiv(M, s.blk.mb) > 1 && flops < kAmxSharedThreadFlops) {  // see kAmxThreadFlops
    nt = 1;
    s.blk = blocking(M, N, Kt, nt, p.transb);
  }
  s.B = static_cast<const u16*>(p.b);
  s.transb = p.transb;
  // With one row block, each B block has one reader: the items pack their own into L2 as they go (B read
  // once, never written back). With several, B is packed once for all of them.
  s.local_b = cdiv(M, s.blk.mb) == 1;
  // Packed A (and B unless local_b), in one buffer kept by the calling thread (or, when large, the call's own).
  const size_t slab = size_t(Kt) * 2 * kTileU16 * 2;  // bytes per 32-row slice of A / 32-column panel of B
  const size_t bytes = slab * size_t(Ms + (s.local_b ? 0 : Np));
  thread_local Keep bkeep;
  const CallBuffer buf(bkeep, bytes);
  u16* Ap = buf.as<u16>();
  u16* Bp = s.local_b ? nullptr : Ap + slab / 2 * Ms;
  s.Ap = Ap;
  s.Bp = Bp;
  const int64_t pp = s.blk.nb / 32, col_items = cdiv(Np, pp), items = cdiv(M, s.blk.mb) * col_items;
  const u16* A = s.A;
  const u16* B = s.B;
  const int64_t kct = s.blk.kct;
  auto global = [&](int64_t jp, int64_t kt) { return b_at(jp, kt, Np, Kt, kct); };
  // Units of packing: slices of A, then K tiles of B [K, N] or panels of B [N, K].
  const int64_t b_units = s.local_b ? 0 : s.transb ? Np : Kt;
  team::ContentionGuard guard(g_solo_amx, nt);
  // One team, no OpenMP barrier (team.h): packing units and then items are handed out dynamically, so
  // a thread whose core the OS lends to another process just does fewer of them.
  team::run_team(guard.threads(), [&](int t, int, team::Team& tm) {
    configure_tiles();
    thread_local Keep keep;
    for (int64_t u; (u = tm.grab()) < Ms + b_units;) {
      if (u < Ms) pack_slice_a(A, M, K, u, 0, Kt, Ap + u * (slab / 2));
      else if (s.transb) pack_nk(B, K, N, u - Ms, 0, Kt, global, Bp);
      else pack_kn(B, K, N, u - Ms, 0, Np, global, Bp);
    }
    guard.barrier(tm, t);  // every unit packed; resets the ticket for the items
    for (int64_t it; (it = tm.grab()) < items;) {
      const int64_t mi = it / col_items, ci = it % col_items;
      run_item(s, mi * s.blk.mb, ci * pp, std::min(Np, (ci + 1) * pp), keep);
    }
    _tile_release();
    guard.body_done(t);
  });
}

}  // namespace pk::cpu
#else  // not x86: no AMX; enabled().amx_bf16 is never true there

#include <stdexcept>

namespace pk::cpu {
void gemm_amx(const GemmParams&) { throw std::logic_error("gemm_amx: AMX exists only on x86-64"); }
}  // namespace pk::cpu
#endif
