// CPU GEMM: C[M,N] = A[M,K] . B[K,N], row-major, dense, fp32 accumulation; f32 and bf16 in/out.
//
// Paths, picked at run time from features() (a portable build keeps the AVX-512 code: it is compiled
// with per-function target attributes):
//   direct  M <= 4 (decode): GEMV-style, B streamed once and never packed (bf16 B stays bf16 and is
//           widened in registers). Threads take 64-row slabs of B (contiguous memory) dynamically,
//           accumulate into private fp32 partials of C, and the partials are summed at the end.
//   slabs   M <= 112: the same slab scheme, but each slab of B is packed into [k][32] panels (L2) and
//           run through the register-blocked micro-kernel, since each B element now feeds many FMAs.
//   in place  small fp32 GEMMs on the AVX-512 and portable tiers (K <= 1024; A and B within L2 up to 16 row panels,
//           else within a sixth of it; from 4 rows when B takes at most a quarter of L2): the micro-kernel reads A,
//           and B stored [K, N], where they are, prefetching B's rows (B [N, K] transposed one panel at a time;
//           gemm_in_place).
//   rows    larger M, BLIS-style: items of up to 8 row panels (112 rows) x all of N, handed out
//           dynamically; per item and K block (KC) the rows of A are packed into [k][row] panels,
//           per N block (NC) B is packed into [k][32] panels, and the micro-kernel (up to 14 rows x
//           32 columns = 28 zmm accumulators) runs over the tiles.
//   bf16 uses vdpbf16ps on K-pairs when the CPU has AVX512_BF16, else it widens to fp32 and uses the
//   fp32 kernel; a CPU without AVX-512 (or a non-x86 build) gets the same drivers with a plain C++
//   micro-kernel that the compiler vectorizes for the build's target, except on aarch64 (tier "neon"):
//   NEON kernels for the direct path, the dot path (linear, M <= 8) and the 8 x 12 micro-kernel of the
//   packed drivers (F32Neon), verified under qemu-aarch64 only, never timed on ARM. On a CPU with AMX-BF16 (tier
//   "amx"), bf16 with M > direct_max_m() (linear: M >= kAmxLinearMinM) goes to the tile kernel of gemm_amx.cpp,
//   unless it is tiny (M N K < kAmxMinMnk).
// bf16 results are rounded to nearest even (as float_to_bf16 in scalar.h); when K spans several KC
// blocks the bf16 partial sums are kept in an fp32 workspace, never in bf16.
// No barrier sits inside a work loop (see Team): on a 2-core VM shared with other processes, a thread
// that loses its core does fewer items instead of stalling the other one; and the short small-M paths
// drop to one thread for a while when thread 0 keeps waiting for a late partner (ContentionGuard).
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/scalar.h"
#include "cpu/scratch.h"
#include "cpu/team.h"
#include "cpu/vec_portable.h"

#if defined(__x86_64__) || defined(_M_X64)
#define PK_X86 1
#include "cpu/vec.h"
#elif defined(__aarch64__)
#include "cpu/vec_neon.h"
#endif

namespace pk::cpu {
namespace {

using team::ContentionGuard;
using team::run_team;
using team::SoloState;
using team::Team;
SoloState g_solo_direct, g_solo_slabs;

using u16 = uint16_t;
using u32 = uint32_t;

// ---- tunables (measured on the 2-core Zen 4 VM: 32 KB L1d, 1 MB L2 per core) ---------------------
// Up to this many rows the direct path wins: each 64 B of B feeds M FMAs, so for M <= 4 the core
// waits on DRAM (~24 GB/s per core) long before its FMA port is busy; packing B would only add work.
// With two full-width zmm FMA pipes (zmm_fma_full_width(): Sapphire Rapids) up to kDirectMaxMWide:
// there, fp32 K = N = 4096, 2 threads, M = 8 took 1.6 ms direct against 2.7 through the slabs (torch
// 2.55); M = 12 / 16 direct were slower than the slabs (3.2 / 4.3 against 3.0 / 3.9 ms).
constexpr int64_t kDirectMaxM = 4;
constexpr int64_t kDirectMaxMWide = 8;
inline int64_t direct_max_m() {
  static const int64_t m = zmm_fma_full_width() ? kDirectMaxMWide : kDirectMaxM;
  return m;
}
// With full-width zmm FMA, up to twice that many rows still take the direct path, in passes of
// direct_max_m() rows over each item of B (64 rows x up to 1024 columns: in L2 for the later passes):
// fp32, K = N = 4096, Sapphire Rapids: M = 9 / 14 / 16 2.4 / 2.9 / 3.4 ms against 3.1 / 3.6 / 3.8 through
// the slabs (torch 3.0 / 3.3 / 3.5), B warm; with B from memory the last pass prefetches the next item
// (gemm_direct_avx512; notes/cpu_gemm.md, twenty-third session).
// fp32 with a B of at most a quarter of L2 runs in place from 4 rows instead (kInPlaceMinM).
inline int64_t direct_two_pass_max_m() {
  static const int64_t m = zmm_fma_full_width() ? 2 * kDirectMaxMWide : kDirectMaxM;
  return m;
}
// Direct path: per-thread fp32 partial of C: M x W floats with W = 16384 / M columns (64 KB, in L2).
// 16 KB partials (shorter rows of B per pass) measured 10-25% slower at M = 4, K = N = 4096.
constexpr int64_t kDirectPartialFloats = 16384;
// Direct path work item: 64 rows of B (at N = 4096 fp32, one contiguous 1 MB run; 64 items at K = 4096,
// so a thread that loses its core to another process simply takes fewer of them).
constexpr int64_t kDirectRows = 64;
// bf16 above direct_max_m() rows runs on AMX tiles when the tier has them (gemm_amx.cpp; M < 16 pads
// the tiles); up to there the GEMV-like shapes are bound by reading B and the direct path reads it
// without packing it first. Sapphire Rapids, K = N = 4096, 2 threads: M = 10 / 14 took 1.6 ms on AMX
// against 2.4-3.0 through the widening packed path (torch 1.35-1.47); M = 16 2.06 (torch 1.9-2.0).
// Below this many FLOPs one thread does it all: an OpenMP fork/join costs a few microseconds.
constexpr double kSerialFlops = 2.0e6;
static_assert(kDirectMaxM >= 1 && kDirectMaxM <= kDirectMaxMWide && kDirectMaxMWide <= 8,
              "direct kernels are instantiated for M = 1..8");
static_assert(kDirectPartialFloats / kDirectMaxMWide >= 1024 && kDirectRows % 8 == 0,
              "direct partial must hold >= 1024 columns; items must hold whole U-row steps");

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- memory -----------------------------------------------------------------------------------------
// The drivers' packing buffers and workspace: kept by the calling thread between calls (scratch.h).
inline Keep& arena() {
  thread_local Keep keep;
  return keep;
}

// Carves 64-byte aligned pieces out of one allocation.
struct Carver {
  size_t off = 0;
  template <class T> size_t take(int64_t count) {
    const size_t at = off;
    off += (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
    return at;
  }
};

// Where a micro-tile's results go. f32 output: f = C, acc = "add to what is there". bf16 output:
// f = fp32 workspace for partial sums; to_bf16 on the last K block: h = (acc ? f : 0) + tile.
struct Out {
  float* f;
  int64_t ldf;
  u16* h;
  int64_t ldh;
  bool acc;
  bool to_bf16;
  int64_t fr = 0, fc = 0;  // the row and column of C that f[0] holds (a block's own fp32 partials; 0: all of C)
  float* at(int64_t row, int64_t col) const {  // C[row][col] in f
    // Inside the block f holds (checked in the C++ harness's builds; the extension's Release build has NDEBUG): a
    // block's partials indexed from column 0 instead of fc stay consistent between a tile's stores and loads, so no
    // output shows it, but they run past the thread's buffer.
    assert(row >= fr && col >= fc && col - fc < ldf);
    return f + (row - fr) * ldf + (col - fc);
  }
};

// The Out of the K block at k0 of a packed GEMM (KC per block) writing C of p: fp32 C accumulates from the second
// block on; a bf16 C gets its fp32 partials in ws (when K takes several blocks) and the sum rounded on the last
// block. ws holds the block of C from row wr, column wc, ldw floats a row (all of C by default).
inline Out k_block_out(const GemmParams& p, float* ws, int64_t k0, int64_t KC, int64_t ldw = -1, int64_t wr = 0,
                       int64_t wc = 0) {
  if (p.dtype != DType::bf16) return Out{static_cast<float*>(p.c), p.N, nullptr, 0, k0 > 0, false};
  return Out{p.K > KC ? ws : nullptr, ldw < 0 ? p.N : ldw, static_cast<u16*>(p.c), p.N, k0 > 0, k0 + KC >= p.K, wr, wc};
}

int pick_threads(const GemmParams& p, double from_flops = kSerialFlops) {
  const double flops = 2.0 * double(p.M) * double(p.N) * double(p.K);
  return flops < from_flops ? 1 : std::max(1, omp_get_max_threads());
}

// The direct and dot paths (GEMMs and linears of a few rows) take threads from this many FLOPs (not kSerialFlops)
// when they have 4 items or more. Sapphire Rapids VM, 2 threads, prepared calls, one thread -> two (us, builds
// alternated twice), avx512 tier: linear 1 x 1024 x 256 12.0-12.2 -> 8.7-9.3, 2 x 1024 x 128 8.1-8.4 -> 7.1-7.7,
// 4 x 512 x 256 10.8-11.4 -> 7.8-8.5, 8 x 256 x 256 10.4-10.5 -> 7.1-7.2; GEMM fp32 / bf16 1 x 1024 x 256 10.4-10.8
// -> 8.5-9.4 / 12.0-12.7 -> 10.6-11.5, 1 x 2048 x 256 (B = L2) 41-44 -> 19-25 / 26-27 -> 17.6-17.7, 3 x 256 x 512
// 8.1-9.0 -> 7.8-8.0 / 9.8-10.2 -> 9.1-9.8, but 2 x 512 x 256 5.9-6.3 -> 6.5-6.8 / level; portable tier linear
// 8 x 1024 x 64 22.8-22.9 -> 16.2-19.8, 4 x 512 x 256 12.1-12.3 -> 8.0-10.3, GEMM fp32 / bf16 1 x 1024 x 256
// 11.4-11.9 -> 6.6-6.9 / 13.4-13.6 -> 8.4-8.5, 1 x 2048 x 256 41-44 -> 14-15 / 29-31 -> 16-17. From 0.25 MFLOP linear
// on the avx512 tier was level or slower (2 x 512 x 128 4.1 -> 4.1-4.6, 1 x 512 x 256 5.0 -> 5.2-5.4).
constexpr double kFewRowsThreadFlops = 0.5e6;
int few_rows_threads(const GemmParams& p, int64_t items) {
  return pick_threads(p, items >= 4 ? kFewRowsThreadFlops : kSerialFlops);
}

// Micro-kernels are templates on the tile's row count R; this maps a runtime R in 1..P::MR to them.
template <class P, size_t... I>
constexpr std::array<typename P::TileFn, sizeof...(I)> tile_table(std::index_sequence<I...>) {
  return {&P::template tile_r<static_cast<int>(I) + 1>...};
}
template <class P> void tile(int R, const typename P::Elem* a, const typename P::Elem* b, int64_t kcu, const Out& o,
                             int64_t row, int64_t col, int nc) {
  static constexpr auto table = tile_table<P>(std::make_index_sequence<P::MR>());
  table[R - 1](a, b, kcu, o, row, col, nc);
}

// =====================================================================================================
// Packed drivers, generic over a policy P:
//   P::Elem         element of the packed panels (float, or u32 = a bf16 pair along K)
//   P::MR, P::NR    micro-tile rows (max) and columns; P::KG = K elements per Elem (1 or 2)
//   P::KC, P::NC    K block and N block of gemm_rows
//   P::pack_a<Src>(src, lda, R, kc, dst)            R rows x kc -> dst[k/KG][R]
//   P::pack_b<Src>(src, ldb, kc, r0, r1, nc, dst, stream)
//                                                   rows [r0,r1) of a kc x nc block -> panels of
//                                                   [k/KG][NR] (zero padded), panel p at p*cdiv(kc,KG)*NR;
//                                                   stream: non-temporal stores where the policy has them
//   P::tile_r<R>(a, b, kcu, out, row, col, nc)      one R x NR tile
//   P::reduce_row<Src>(parts, stride, nt, n, c)     c[j] = sum_t parts[t*stride + j], j < n
// Neither driver has a barrier inside its work loop: work items are handed out dynamically and each
// owns its piece of the output, so a thread whose core the OS lends to another process just does
// fewer items, and nobody waits for it mid-way.
// =====================================================================================================
// B stored [N, K] (GemmParams::transb, pk.linear): the same panels as P::pack_b, filled from B^T.
// Element (k, n) of the block is src[n * ldb + k]: a panel column is a contiguous run of K, and a bf16
// K-pair (B[n][k], B[n][k+1]) is one u32, low half first as pack_a makes it. Blocked by one cache line
// of K per column (KB elements), so a 32-column x KB block is read line by line and written into L1.
// Consecutive columns are ldb elements apart (16 KB at K = 4096 fp32): a new page per column, which the
// hardware prefetcher does not follow; the lines kPackTPrefetchCols columns ahead are prefetched.
// Plain C++ for every policy: it runs once per block of B, like pack_b, not in the micro-kernel.
constexpr int64_t kPackTPrefetchCols = 8;
template <class P, class Src>
void pack_bt(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1, int64_t nc, typename P::Elem* dst) {
  using E = typename P::Elem;
  constexpr int64_t NR = P::NR, KG = P::KG, KB = 64 / int64_t(sizeof(Src));
  static_assert(KB % KG == 0, "a cache line of K holds whole K-pairs");
  const int64_t kcu = cdiv(kc, KG);
  for (int64_t q = 0; q * NR < nc; ++q) {
    E* dq = dst + q * kcu * NR;
    const int64_t cols = std::min(NR, nc - q * NR);
    for (int64_t k0 = r0; k0 < r1; k0 += KB) {
      const int64_t k1 = std::min(r1, k0 + KB);
      for (int64_t j = 0; j < NR; ++j) {
        if (j >= cols) {
          for (int64_t k = k0; k < k1; k += KG) dq[(k / KG) * NR + j] = E(0);
          continue;
        }
        const int64_t n = q * NR + j;
        if (n + kPackTPrefetchCols < nc) __builtin_prefetch(src + (n + kPackTPrefetchCols) * ldb + k0);
        const Src* s = src + n * ldb;
        for (int64_t k = k0; k < k1; k += KG) {
          if constexpr (KG == 1) {
            if constexpr (std::is_same_v<Src, float>) {
              dq[k * NR + j] = s[k];
            } else {
              dq[k * NR + j] = bf16_to_float(s[k]);
            }
          } else {
            static_assert(KG == 2 && std::is_same_v<Src, u16>, "K-pairs are packed from bf16 only");
            dq[(k / 2) * NR + j] = static_cast<u32>(s[k]) | (k + 1 < kc ? static_cast<u32>(s[k + 1]) << 16 : 0u);
          }
        }
      }
    }
  }
}

// Whether policy P has its own pack_bt (P::pack_t, same arguments).
template <class P, class Src, class = void> struct HasPackT : std::false_type {};
template <class P, class Src>
struct HasPackT<P, Src, std::void_t<decltype(&P::template pack_t<Src>)>> : std::true_type {};

// The B block at (k0, j0) of either layout, packed by the policy's pack_b or by pack_bt (or the policy's pack_t).
template <class P, class Src>
inline void pack_b_any(bool transb, const Src* B, int64_t N, int64_t K, int64_t k0, int64_t j0, int64_t kc,
                       int64_t r0, int64_t r1, int64_t nc, typename P::Elem* dst, bool stream = false) {
  if constexpr (HasPackT<P, Src>::value) {
    if (transb) return P::template pack_t<Src>(B + j0 * K + k0, K, kc, r0, r1, nc, dst, stream);
  }
  if (transb) return pack_bt<P, Src>(B + j0 * K + k0, K, kc, r0, r1, nc, dst);
  P::template pack_b<Src>(B + k0 * N + j0, N, kc, r0, r1, nc, dst, stream);
}

// M of fewer than this many row panels (M <= 98 with 14-row panels) on several threads goes to gemm_cols (N
// split), or to gemm_slabs (K split) when N has too few column panels to share out.
constexpr int64_t kSmallPanels = 8;
// gemm_rows: row groups of up to kRowItemPanels row panels (112 rows) when B is packed once (with one
// column block their sizes shrink towards the end, guided, so that threads finish together); larger
// ones when every item packs its own B blocks (see gemm_rows).
constexpr int64_t kRowItemPanels = 8;
// gemm_rows: B is packed once, by all threads, before the items when it takes at most this much (fp32
// 2048 x 4096); else each item packs its own L2-sized blocks (B packed again for every item: with
// that alone, fp32 1024^3 on 2 threads measured 0.82 of torch on a quiet Zen 4). 128 MB before: a packed
// B above the 64 MB arena was freshly mapped on every call (16K page faults at 64 MB), and writing all of
// B out and reading it back costs more than packing blocks as they are needed once B outgrows the
// caches. Sapphire Rapids VM, fp32, 2 threads, shared (128 MB limit) / per item: M = 128, N = K = 4096
// 40 / 17.4 ms (torch 13.3; 27 ms shared with an arena kept large enough), M = 512 85 / 60 ms (torch 49);
// 2048^3 shared (16 MB) 0.81-0.88 of torch, per item 0.81.
constexpr int64_t kSharedPackedBBytes = int64_t(32) << 20;
// Up to this many bytes of packed B every thread packs all of B for itself: no barrier between the
// packing and the products (a thread that starts late on a shared VM only takes fewer items) and no
// reads from the other core's L2. Sapphire Rapids VM, fp32, 2 threads, shared vs private: 128^3 27.9 vs
// 16.4 us (torch 16.6), 192^3 59.8 vs 46.5, 256^3 123 vs 102, 512^3 761 vs 753, 1024^3 (4 MB) 6.53 vs
// 6.23 ms; above, packing all of B twice starts to cost (2048^3: 16 MB).
constexpr int64_t kPrivatePackedBBytes = int64_t(4) << 20;
// gemm_slabs: per-thread fp32 partial of C, M x W floats, at most 256 KB (L2 holds it and the slab).
constexpr int64_t kSlabPartialFloats = 64 * 1024;
// gemm_slabs: a slab of B (KS rows x W columns) packed at once: at most 512 KB, half of L2.
constexpr int64_t kSlabBytes = 512 * 1024;

// K and N blocks of gemm_rows from the caches this CPU reports (cpu.h caches()), not from constants:
// KC: the A micro-panel (MR x KC) takes at most half of L1d (power of two, whole K groups); NC: the
// packed B block (KC x NC) at most half of L2. On the 32 KB L1d / 1 MB L2 Zen 4 they were tuned on
// this gives the policies' own KC, NC (fp32 256 x 512, bf16 512 x 512, which stay as the reference);
// a 2 MB L2 gets NC 1024, a 256 KB L2 NC 128, a 64 KB L1d KC 512 (fp32).
struct Blocks {
  int64_t KC, NC;
};
template <class P> const Blocks& cache_blocks() {
  static const Blocks b = [] {
    const Caches& c = caches();
    const int64_t per_k = static_cast<int64_t>(sizeof(typename P::Elem)) / P::KG;  // bytes per K element
    int64_t kc = 64;
    while (kc * 2 * P::MR * per_k <= c.l1d / 2 && kc < 2048) kc *= 2;
    kc = std::max<int64_t>(kc / P::KG * P::KG, P::KG);
    const int64_t nc = std::clamp<int64_t>(c.l2 / 2 / (kc * per_k) / P::NR * P::NR, 4 * P::NR, 8192);
    return Blocks{kc, nc};
  }();
  return b;
}

// Large M: items are groups of row panels x all of N. Per item: for each K block, pack its rows of
// A, then for each N block pack B (private to the thread, L2-sized) and run the tiles.
template <class P, class Src> void gemm_rows(const GemmParams& p) {
  using E = typename P::Elem;
  constexpr int64_t MR = P::MR, NR = P::NR, KG = P::KG;
  const int64_t KC = cache_blocks<P>().KC, NC = cache_blocks<P>().NC;  // whole micro-panels (see there)
  const int64_t KCU = KC / KG, NCP = NC / NR;
  const int64_t M = p.M, N = p.N, K = p.K;
  const Src* A = static_cast<const Src*>(p.a);
  const Src* B = static_cast<const Src*>(p.b);
  const bool bf16_out = p.dtype == DType::bf16, multi_k = K > KC;
  const int64_t mp = cdiv(M, MR), np = cdiv(N, NR);
  auto row0 = [&](int64_t i) { return M * i / mp; };  // panel i: rows [row0(i), row0(i+1)), <= MR rows
  auto rows = [&](int64_t i) { return static_cast<int>(row0(i + 1) - row0(i)); };
  auto cols = [&](int64_t j) { return static_cast<int>(std::min(NR, N - j * NR)); };

  int nt = pick_threads(p);
  // Items are (group of row panels) x (block of NCP column panels). With one column block, row groups
  // of up to kRowItemPanels panels, small enough for ~3 items per thread; with several, groups balanced
  // in size (of up to kRowItemPanels panels, or `rip` below), and the items of one column block are
  // consecutive, so that the threads work on the same block of B at the same time (read from memory once). Rows only, a
  // short wide GEMM streamed all of B once per row item: fp32 M = 128 / 512, N = K = 4096 took 55-65 /
  // 128 ms against torch's 15 / 51 (Sapphire Rapids VM, 2 threads).
  const int64_t ncb = cdiv(np, NCP);
  const int64_t kblocks = cdiv(K, KC), b_all = kblocks * np * KCU * NR;
  const bool shared_b = b_all * int64_t(sizeof(E)) <= kSharedPackedBBytes;
  // With B packed per item (too large to pack once), every row group packs all of B again: then the groups
  // are as large as half of L2 holds their packed A (beside the item's B block), but at least one item per
  // thread. Sapphire Rapids VM, fp32, 2 threads, N = K = 4096 (groups of 8 panels before): M = 128
  // 19.1-20.1 -> 16.0-16.7 ms, M = 512 66.8-70.4 -> 55.9-57.1 ms (one group of 10 / 37 panels).
  const int64_t rip = shared_b ? kRowItemPanels
                               : std::max<int64_t>(kRowItemPanels, caches().l2 / 2 / (MR * KCU * int64_t(sizeof(E))));
  // Equal groups for column-block items; with one column block, or with B packed once for all items and
  // groups enough to share out (~3 per thread), an item is a row group x all of N (whole_rows): its rows of A
  // are then packed once per K block, not once per column block (2048^3 has 4 column blocks), and the groups
  // shrink towards the end (the last items balance the threads). Zen 5, 2 threads, C++ driver alternated
  // 6x: 2048^3 bf16 964-1008 -> 1024-1039 GFLOP/s, fp32 490-505 -> 512-518 (equal groups with A packed once:
  // 989-998 / 481-503); 1024^3 fp32 4.27-4.32 -> 4.17 ms. With fewer groups (M = 256, N = 4096: one group per
  // thread and a half) the column blocks stay items: whole rows there were 2-3% slower (small groups re-read
  // all of B). Whole rows only while the packed B takes at most half of L3: every whole-row item streams all of
  // it, from memory once it outgrows L3, while the threads on column-block items read each block of B together.
  // Zen 4 VM (32 MB L3), C++ driver, 2 threads, alternated twice: bf16 2048 x 4096 x 4096 (32 MB packed) 188-190
  // -> 184-186 ms, linear 1024 x 4096 x 4096 88-89 -> 82-83; 2048 x 2048 x 4096 bf16 (16 MB) as before. (The
  // Sapphire Rapids VM reports a 480 MB L3: nothing changes there.)
  const int64_t groups = std::min(mp, std::max(cdiv(mp, rip), cdiv(int64_t(nt), ncb)));
  const bool whole_rows =
      ncb == 1 || (shared_b && groups >= 3 * int64_t(nt) && b_all * int64_t(sizeof(E)) <= caches().l3 / 2);
  std::vector<int64_t> bounds{0};  // row group g = row panels [bounds[g], bounds[g+1])
  if (whole_rows) {
    while (bounds.back() < mp) {
      const int64_t left = mp - bounds.back();
      bounds.push_back(bounds.back() + std::clamp<int64_t>(cdiv(left, 3 * int64_t(nt)), 1, kRowItemPanels));
    }
  } else {
    for (int64_t g = 1; g <= groups; ++g) bounds.push_back(mp * g / groups);
  }
  const int64_t ngroups = static_cast<int64_t>(bounds.size()) - 1, items = whole_rows ? ngroups : ngroups * ncb;
  int64_t gmax = 0;
  for (int64_t g = 0; g < ngroups; ++g) gmax = std::max(gmax, bounds[g + 1] - bounds[g]);
  nt = static_cast<int>(std::min<int64_t>(nt, items));

  // B packed once for all items when it fits (one barrier; small: once per thread, no barrier), else per
  // item into an L2-sized block.
  const bool private_b = shared_b && nt > 1 && b_all * int64_t(sizeof(E)) <= kPrivatePackedBBytes;
  // A B packed once and too large for the private copies goes out with non-temporal stores (no line read
  // before it is written, no eviction of the caches' lines of A and C); the items read it back block by block.
  // Zen 5, 2 threads, bf16 2048^3 (perf): packing 4.2-4.9 -> 3.2-3.5% of the samples, the micro-kernels'
  // share unchanged; C++ driver alternated 8-10x: medians +1% (2048^3 bf16, 3072^3 both), level elsewhere.
  const bool stream_b = shared_b && b_all * int64_t(sizeof(E)) > kPrivatePackedBBytes;

  Carver cv;
  const size_t a_off = cv.take<E>(nt * gmax * MR * KCU);
  const size_t b_off = cv.take<E>(private_b ? nt * b_all : shared_b ? b_all : nt * NCP * KCU * NR);
  // A bf16 C over several K blocks: each thread's fp32 partials of its item's block of C (the group's rows x the
  // item's columns), not of all of C. An M x N workspace took the call's scratch past arena()'s kept size at
  // 2048 x 4096 x 4096 (32 MB packed B + 32 MB): a fresh allocation per call, its page faults 10-14% of the call's
  // time (Zen 4 VM, C++ driver: 189-193 ms, 167-174 with the scratch kept); the block's partials also stay in L2
  // (column-block items) or L3 instead of streaming to memory and back once per K block.
  const int64_t wcols = whole_rows ? N : std::min(N, NCP * NR), wsz = bf16_out && multi_k ? gmax * MR * wcols : 0;
  const size_t w_off = cv.take<float>(nt * wsz);
  const CallBuffer scratch(arena(), cv.off);
  char* base = scratch.as<char>();

  run_team(nt, [&](int t, int nt, Team& team) {
    float* wt = reinterpret_cast<float*>(base + w_off) + t * wsz;
    E* ap = reinterpret_cast<E*>(base + a_off) + t * gmax * MR * KCU;
    E* bp = reinterpret_cast<E*>(base + b_off) + (private_b ? t * b_all : shared_b ? 0 : t * NCP * KCU * NR);
    if (shared_b) {  // each thread packs a share of the rows of every K block (whole rows of B), or all
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const int64_t k0 = kb * KC, kc = std::min(KC, K - k0), kcu = cdiv(kc, KG);
        const int64_t u0 = private_b ? 0 : kcu * t / nt, u1 = private_b ? kcu : kcu * (t + 1) / nt;
        pack_b_any<P, Src>(p.transb, B, N, K, k0, 0, kc, u0 * KG, std::min(kc, u1 * KG), N, bp + kb * np * KCU * NR,
                           stream_b);
      }
      if (!private_b) team.barrier();
    }
    for (int64_t it; (it = team.grab()) < items;) {
      const int64_t g = it % ngroups, cb = whole_rows ? 0 : it / ngroups, cb1 = whole_rows ? ncb : cb + 1;
      const int64_t i0 = bounds[g], i1 = bounds[g + 1];
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kcu = cdiv(kc, KG);
        // the thread's partials: this item's block of C, from row row0(i0) and its first column panel
        const Out o = k_block_out(p, wt, k0, KC, wcols, row0(i0), cb * NCP * NR);
        for (int64_t i = i0; i < i1; ++i)
          P::template pack_a<Src>(A + row0(i) * K + k0, K, rows(i), kc, ap + (row0(i) - row0(i0)) * kcu);
        for (int64_t jb = cb * NCP; jb < std::min(np, cb1 * NCP); jb += NCP) {
          const int64_t je = std::min(jb + NCP, np);
          const E* b = bp + (k0 / KC) * np * KCU * NR + jb * kcu * NR;
          if (!shared_b) {
            pack_b_any<P, Src>(p.transb, B, N, K, k0, jb * NR, kc, 0, kc, std::min(N, je * NR) - jb * NR, bp);
            b = bp;
          }
          for (int64_t i = i0; i < i1; ++i) {
            const E* a = ap + (row0(i) - row0(i0)) * kcu;
            for (int64_t j = jb; j < je; ++j)
              tile<P>(rows(i), a, b + (j - jb) * kcu * NR, kcu, o, row0(i), j * NR, cols(j));
          }
        }
      }
    }
    team.barrier();  // wait here (spin, then sleep), not in the OpenMP join (spin only)
  });
}

// Small M and narrow N (fewer than kColsPanelsPerThread column panels per thread, else gemm_cols): B is
// streamed in slabs of KS whole rows (contiguous memory) handed out dynamically; each thread accumulates its
// slabs into a private fp32 partial of C, and the partials are summed at the end.
template <class P, class Src> void gemm_slabs(const GemmParams& p) {
  using E = typename P::Elem;
  constexpr int64_t MR = P::MR, NR = P::NR, KG = P::KG;
  const int64_t M = p.M, N = p.N, K = p.K;
  const Src* A = static_cast<const Src*>(p.a);
  const Src* B = static_cast<const Src*>(p.b);
  Src* C = static_cast<Src*>(p.c);
  const int64_t mp = cdiv(M, MR);
  auto row0 = [&](int64_t i) { return M * i / mp; };
  auto rows = [&](int64_t i) { return static_cast<int>(row0(i + 1) - row0(i)); };
  // W columns per pass (all of N when the partial fits), KS rows per slab (32 at W = 4096 fp32).
  const int64_t W = std::min(cdiv(N, NR) * NR, std::max(NR, kSlabPartialFloats / M / NR * NR));
  const int64_t KS = std::clamp<int64_t>(kSlabBytes / (W * int64_t(sizeof(E)) / KG) / 8 * 8, 8, 256);
  const int64_t KSU = KS / KG, items = cdiv(K, KS);
  ContentionGuard guard(g_solo_slabs, static_cast<int>(std::min<int64_t>(pick_threads(p), items)));
  const int nt = guard.threads();

  Carver cv;
  const size_t a_off = cv.take<E>(nt * mp * MR * KSU);
  const size_t b_off = cv.take<E>(nt * W * KSU);
  const size_t c_off = cv.take<float>(nt * M * W);
  const CallBuffer scratch(arena(), cv.off);
  char* base = scratch.as<char>();
  float* parts = reinterpret_cast<float*>(base + c_off);

  run_team(nt, [&](int t, int nt, Team& team) {
    E* ap = reinterpret_cast<E*>(base + a_off) + t * mp * MR * KSU;
    E* bp = reinterpret_cast<E*>(base + b_off) + t * W * KSU;
    float* part = parts + t * M * W;
    for (int64_t j0 = 0; j0 < N; j0 += W) {
      const int64_t w = std::min(W, N - j0), npw = cdiv(w, NR);
      std::memset(part, 0, sizeof(float) * M * W);
      const Out o{part, W, nullptr, 0, true, false};
      for (int64_t it; (it = team.grab()) < items;) {
        const int64_t k0 = it * KS, kc = std::min(KS, K - k0), kcu = cdiv(kc, KG);
        for (int64_t i = 0; i < mp; ++i)
          P::template pack_a<Src>(A + row0(i) * K + k0, K, rows(i), kc, ap + row0(i) * kcu);
        pack_b_any<P, Src>(p.transb, B, N, K, k0, j0, kc, 0, kc, w, bp);
        for (int64_t j = 0; j < npw; ++j)
          for (int64_t i = 0; i < mp; ++i)
            tile<P>(rows(i), ap + row0(i) * kcu, bp + j * kcu * NR, kcu, o, row0(i), j * NR,
                    static_cast<int>(std::min(NR, w - j * NR)));
      }
      guard.barrier(team, t);
      // Last pass: thread 0 sums alone (<= 64K floats per thread) and nobody waits on it any more.
      const bool last = j0 + W >= N;
      const int64_t m0 = last ? 0 : M * t / nt, m1 = last ? (t == 0 ? M : 0) : M * (t + 1) / nt;
      for (int64_t m = m0; m < m1; ++m)
        P::template reduce_row<Src>(parts + m * W, M * W, nt, w, C + m * N + j0);
      if (!last) guard.barrier(team, t);  // the partials are reused by the next pass
    }
    guard.body_done(t);
  });
}

// Small M with N of at least kColsPanelsPerThread column panels per thread: the threads split N, not K. A is
// packed once (each thread a share of its row panels x K blocks, then one barrier); the items are blocks of
// column panels, about a third of a thread's share of N (at most the cache blocking's NC), and each packs its
// block of B per K block into a private L2-sized buffer and runs every row panel against it. B is read once in
// all and C written once, with no partial sums to zero, add and reduce (gemm_slabs' cost: it splits K) and no
// single item when K is one slab. Zen 4 VM (family 25), 2 threads, prepared calls, slabs -> columns, two
// alternations: bf16 (vdpbf16ps) 64 x 512 x 256 90 -> 50 us (torch 60), 32 x 512 x 512 63 -> 52 (torch 64),
// 24 x 1024 x 128 44 -> 22 (torch 36-46), 64 x 4096 x 512 841 -> 727-743 (torch 730-737), 16 x 4096 x 4096
// 2.75-2.92 -> 2.53-2.65 ms (torch 3.4-3.6); fp32 avx512 32 x 4096 x 4096 8.6-8.7 -> 8.1-8.3 ms, 64 x 4096 x
// 4096 13.6-13.7 -> 12.8-13.2, 48 x 8192 x 1024 5.5 -> 5.1-5.2; portable tier 32 x 512 x 512 141-147 ->
// 118 us, 64 x 4096 x 512 1.92-1.95 -> 1.64-1.84 ms. (A first version packed A again in every item: 96 x 1024
// x 4096 fp32 4.4 -> 4.9-5.3 ms, A as large as a third of B packed six times.)
constexpr int64_t kColsPanelsPerThread = 3;
template <class P, class Src> void gemm_cols(const GemmParams& p, int nt) {
  using E = typename P::Elem;
  constexpr int64_t MR = P::MR, NR = P::NR, KG = P::KG;
  const int64_t KC = cache_blocks<P>().KC, KCU = KC / KG;
  const int64_t M = p.M, N = p.N, K = p.K;
  const Src* A = static_cast<const Src*>(p.a);
  const Src* B = static_cast<const Src*>(p.b);
  const bool bf16_out = p.dtype == DType::bf16, multi_k = K > KC;
  const int64_t mp = cdiv(M, MR), np = cdiv(N, NR), kblocks = cdiv(K, KC);
  auto row0 = [&](int64_t i) { return M * i / mp; };  // panel i: rows [row0(i), row0(i+1)), <= MR rows
  auto rows = [&](int64_t i) { return static_cast<int>(row0(i + 1) - row0(i)); };
  auto cols = [&](int64_t j) { return static_cast<int>(std::min(NR, N - j * NR)); };
  // Items of equal size to a panel (item it: column panels [col0(it), col0(it + 1))). Items of 6 panels left 14 of
  // 32 panels to one thread and 18 to the other: Zen 4 VM, 2 threads, bf16, alternated 3x, 96 x 1024 x 4096
  // 2.34-2.41 -> 2.16-2.18 ms (torch 2.06-2.25), 80 x 1024 x 1024 455-457 -> 431-433 us (torch 426-437), 64 x 512
  // x 256 50 -> 45; fp32 96 x 1024 x 4096 5.08 -> 4.53 ms.
  const int64_t items = std::min(np, std::max(kColsPanelsPerThread * int64_t(nt), cdiv(np, cache_blocks<P>().NC / NR)));
  const int64_t ncp = cdiv(np, items), a_block = mp * MR * KCU;  // packed A: K block kb at kb * a_block
  auto col0 = [&](int64_t it) { return np * it / items; };
  nt = static_cast<int>(std::min<int64_t>(nt, items));

  Carver cv;
  const size_t a_off = cv.take<E>(kblocks * a_block);
  const size_t b_off = cv.take<E>(nt * ncp * KCU * NR);
  const size_t w_off = cv.take<float>(bf16_out && multi_k ? M * N : 0);
  const CallBuffer scratch(arena(), cv.off);
  char* base = scratch.as<char>();
  E* ap = reinterpret_cast<E*>(base + a_off);
  float* ws = reinterpret_cast<float*>(base + w_off);

  run_team(nt, [&](int t, int nt, Team& team) {
    const int64_t units = kblocks * mp;  // (K block, row panel)
    for (int64_t u = units * t / nt; u < units * (t + 1) / nt; ++u) {
      const int64_t kb = u / mp, i = u % mp, k0 = kb * KC, kc = std::min(KC, K - k0);
      P::template pack_a<Src>(A + row0(i) * K + k0, K, rows(i), kc, ap + kb * a_block + row0(i) * cdiv(kc, KG));
    }
    team.barrier();
    E* bp = reinterpret_cast<E*>(base + b_off) + t * ncp * KCU * NR;
    for (int64_t it; (it = team.grab()) < items;) {
      const int64_t jb = col0(it), je = col0(it + 1);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0), kcu = cdiv(kc, KG);
        const Out o = k_block_out(p, ws, k0, KC);
        pack_b_any<P, Src>(p.transb, B, N, K, k0, jb * NR, kc, 0, kc, std::min(N, je * NR) - jb * NR, bp);
        const E* a = ap + (k0 / KC) * a_block;
        for (int64_t i = 0; i < mp; ++i)
          for (int64_t j = jb; j < je; ++j)
            tile<P>(rows(i), a + row0(i) * kcu, bp + (j - jb) * kcu * NR, kcu, o, row0(i), j * NR, cols(j));
      }
    }
    team.barrier();  // wait here (spin, then sleep), not in the OpenMP join (spin only)
  });
}

// On one thread the slabs' partial (zeroed, then added into C) and gemm_cols' barrier only cost: a small GEMM
// run serially goes to gemm_rows, which writes C directly. fp32 prepared calls, Sapphire Rapids VM: 48^3 / 64^3
// 2.9 / 5.0 -> 2.4 / 4.0 us (torch 2.6 / 4.9-5.2); 16^3-32^3 and bf16 unchanged.
template <class P, class Src> void gemm_packed(const GemmParams& p) {
  const int nt = pick_threads(p);
  if (cdiv(p.M, P::MR) < kSmallPanels && nt > 1) {
    if (cdiv(p.N, P::NR) >= kColsPanelsPerThread * nt) return gemm_cols<P, Src>(p, nt);
    return gemm_slabs<P, Src>(p);
  }
  gemm_rows<P, Src>(p);
}

// ---- packing in plain C++ (fp32 panels, bf16 widened), for the portable and NEON policies -------------
template <int64_t NR> struct PlainPack {
  template <class Src> static float ld(const Src* s, int64_t i) {
    if constexpr (std::is_same_v<Src, float>) {
      return s[i];
    } else {
      return bf16_to_float(s[i]);
    }
  }
  template <class Src> static void pack_a(const Src* src, int64_t lda, int R, int64_t kc, float* dst) {
    for (int r = 0; r < R; ++r)
      for (int64_t k = 0; k < kc; ++k) dst[k * R + r] = ld(src, r * lda + k);
  }
  template <class Src>
  static void pack_b(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1, int64_t nc, float* dst, bool) {
    for (int64_t k = r0; k < r1; ++k)
      for (int64_t q = 0; q * NR < nc; ++q)
        for (int64_t j = 0; j < NR; ++j)
          dst[(q * kc + k) * NR + j] = q * NR + j < nc ? ld(src, k * ldb + q * NR + j) : 0.f;
  }
  template <class Src> static void reduce_row(const float* parts, int64_t stride, int nt, int64_t n, Src* c) {
    for (int64_t j = 0; j < n; ++j) {
      float v = parts[j];
      for (int t = 1; t < nt; ++t) v += parts[t * stride + j];
      if constexpr (std::is_same_v<Src, float>) {
        c[j] = v;
      } else {
        c[j] = float_to_bf16(v);
      }
    }
  }
  // rows r < R, columns j < nc of a tile's fp32 results into the output (see Out)
  template <int R, int W> static void store_tile(const float (&acc)[R][W], const Out& o, int64_t row, int64_t col, int nc) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nc; ++j) {
        float v = acc[r][j];
        if (o.acc) v += o.at(row + r, col + j)[0];
        if (o.to_bf16) {
          o.h[(row + r) * o.ldh + col + j] = float_to_bf16(v);
        } else {
          o.at(row + r, col + j)[0] = v;
        }
      }
  }
};

// ---- portable policy: plain C++ on the target's vectors (vec_portable.h), no intrinsics ------------------
// Micro-tile MR rows x 2 vectors. 16 vector registers (x86 SSE / AVX2, and the default elsewhere): MR = 6, 12
// accumulators + 2 of B + 1 broadcast. AVX-512 (32 registers): MR = 14, 28 + 2 + 1, the AVX-512 tier's tile
// (F32Avx512). Per k step: 2 loads of B, MR broadcasts of A, 2 MR multiply-adds (contracted to FMA where the
// target has it), and the B row kBPrefetchSteps ahead prefetched (__builtin_prefetch: the micro-panel streams
// from L2, as the AVX-512 kernel found). Sapphire Rapids VM, 2048^3 fp32, 2 threads, C++ driver, builds
// alternated 4x: 83-86 ms (6 rows) -> 71-73 (with the prefetch) -> 65.5-66 (14 rows), the AVX-512 tier 58 ms
// (notes/isa_tiers.md). bf16 is widened to fp32 while packing (PlainPack).
// k steps ahead at which the micro-kernels prefetch B's row (the measurement is at F32Avx512, the policy it
// was tuned for; the portable one took it over: notes/isa_tiers.md).
constexpr int64_t kBPrefetchSteps = 16;
// k steps ahead at which gemm_in_place's tiles prefetch B's row when they read B where it is: from memory on a first
// call (a packed panel is in L2 and needs none). Sapphire Rapids VM, 2 threads, prepared calls on inputs rotating
// through copies of 512 MB (B cold), AVX-512 tier, us: 20 x 512 x 512 215 -> 117, 28 x 256 x 256 65 -> 34, 64 x 256 x
// 256 82 -> 57, 128^3 36 -> 29; forced portable tier 206 / 63 / 84 / 34 -> 122 / 33 / 57 / 32; 16 steps ahead ~20%
// slower than 32 or 64; with B warm level or 5-10% faster (64 x 512 x 256 65 -> 58-61 us). The AVX2 tier's 6 x 16 tile
// (one line of B a row) measured no change at 8, 32 or 96 steps and has none (notes/cpu_gemm.md, twenty-fifth session).
constexpr int64_t kInPlacePrefetchSteps = 32;

struct Portable : PlainPack<2 * pv::kLanes> {
  using Elem = float;
  using TileFn = void (*)(const float*, const float*, int64_t, const Out&, int64_t, int64_t, int);
  static constexpr int64_t MR = PK_PV_BYTES == 64 ? 14 : 6, NR = 2 * pv::kLanes, KG = 1, KC = 256, NC = 512;

  // The tile over K steps: row r's value of A at step k is a[r * ar + k * ak] (packed [k][R]: ar = 1, ak = R; in
  // place: ar = lda, ak = 1), B's row k at b + k * ldb (a packed panel: ldb = NR); Pf > 0: prefetch B's row Pf steps
  // ahead, into L1 (as the AVX-512 micro-kernel does: a packed micro-panel streams from L2, B in place from memory).
  template <int R, int64_t Pf> static inline __attribute__((always_inline)) void tile_k(
      const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb, int64_t K, const Out& o, int64_t row,
      int64_t col, int nc) {
    pv::vf acc[R][2];
#pragma GCC unroll 14
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = pv::vf{};
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (Pf > 0) {
        __builtin_prefetch(b + (k + Pf) * ldb, 0, 3);
        if constexpr (NR * 4 > 64) __builtin_prefetch(b + (k + Pf) * ldb + 16, 0, 3);
      }
      const pv::vf b0 = pv::load(b + k * ldb), b1 = pv::load(b + k * ldb + pv::kLanes);
#pragma GCC unroll 14
      for (int r = 0; r < R; ++r) {
        const float av = a[r * ar + k * ak];
        acc[r][0] += b0 * av;
        acc[r][1] += b1 * av;
      }
    }
    store_acc<R>(acc, o, row, col, nc);
  }
  template <int R> static void tile_r(const float* a, const float* b, int64_t kcu, const Out& o, int64_t row,
                                      int64_t col, int nc) {
    tile_k<R, kBPrefetchSteps>(a, 1, R, b, NR, kcu, o, row, col, nc);
  }
  template <int R> static void store_acc(const pv::vf (&acc)[R][2], const Out& o, int64_t row, int64_t col, int nc) {
    if (nc == NR && !o.to_bf16) {  // full fp32 tile: vector loads and stores of C
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        float* c = o.at(row + r, col);
        for (int v = 0; v < 2; ++v) pv::store(c + v * pv::kLanes, o.acc ? acc[r][v] + pv::load(c + v * pv::kLanes) : acc[r][v]);
      }
      return;
    }
    float t[R][NR];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 2; ++v) pv::store(&t[r][v * pv::kLanes], acc[r][v]);
    store_tile<R, NR>(t, o, row, col, nc);
  }
  // gemm_in_place's tiles: A's R rows where they are (lda apart), B's rows where they are (ldb apart; whole panels
  // only: no masked loads here, the last narrower panel is packed and goes to tile_a_in_place) or a packed panel.
  static constexpr bool kInPlaceMasked = false;
  template <int R, bool Full> static void tile_in_place(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                        int64_t K, const Out& o, int64_t row, int64_t col, int nc) {
    static_assert(Full, "whole column panels only");
    tile_k<R, kInPlacePrefetchSteps>(a, lda, 1, b, ldb, K, o, row, col, nc);
  }
  template <int R> static void tile_a_in_place(const float* a, int64_t lda, const float* b, int64_t K, const Out& o,
                                               int64_t row, int64_t col, int nc) {
    tile_k<R, 0>(a, lda, 1, b, NR, K, o, row, col, nc);
  }
};

// Small fp32 GEMMs: the micro-kernel reads A where it is, and B too when stored [K, N] (F32Avx512::tile_in_place); B
// stored [N, K] (linear) is transposed one 32-column panel at a time (pack_t) by the item that uses it, column panels
// outer (tile_a_in_place). At these sizes packing A is work of the order of the products' (a -g build's profile of
// 96^3 on one thread: 19% of the samples in gemm_rows' packing, 77% in the tiles), and with 2 threads gemm_rows packs
// all of B in each thread, gemm_slabs (M <= 98) zeroes and sums partials. Items ([K, N]): row panels x column groups
// (enough to share out, ~3 per thread), over all of K; the column panels of an item follow each other (A's row panel
// stays in L1). Taken when K <= kInPlaceMaxK (A's rows are read as K-long streams) and A and B together take at most a
// sixth of L2, or all of it with at most kInPlaceL2Panels row panels. Sapphire Rapids VM (2 MB L2), C++ driver, the
// packed and in-place paths alternated in one process, 5-8 rounds, medians of a round (us): 1 thread 64^3 3.45 ->
// 2.81, 96^3 11.0 -> 9.9, 128^3 24.6 -> 23.6, 160^3 and 192^3 1-2% faster, 256^3 2% slower; 2 threads 112^3 12.7 ->
// 11.1, 128^3 16.3 -> 14.3, 160^3 29.2 -> 28.5, 192^3 46.5 -> 45.3, 256^3 103.8 -> 107.9 and 384^3 283-285 -> 304-336
// (so not taken there), 96 x 128 x 128 21.5 -> 13.2, 64 x 256 x 256 53.2 -> 28.6, 32 x 512 x 256 55.2 -> 26.3, 100 x
// 100 x 1000 89.0 -> 71.7; past a sixth of L2 (best-worst of 5 rounds, two runs) 32 x 512 x 512 65-72 -> 48-64, 64 x
// 512 x 256 95-97 -> 47-50, 40 x 300 x 1000 82-91 -> 65-74, 64 x 640 x 640 192-216 -> 169-186, 96 x 768 x 384 181-185
// -> 177-198, 32 x 1024 x 1024 level (notes/cpu_gemm.md). Not verified on a CPU with a 1 MB L2 (Zen 4 / Zen 5).
// Reading B in place with the column panels outer (B's panel meant to stay in L1) was level: at N = 128 its rows
// are 512 B apart and a panel maps to 16 of L1d's 64 sets; packing each column panel then (A in place) won on one
// thread from 128^3 (-7%) but lost at 64^3 (+20%) and on 2 threads (+10-25%).
// Generic over the policy: the portable tier's tiles (Portable) read whole panels of B in place and pack the narrower
// last one, once per thread (no masked loads in plain C++; packed per item first: 80^3 / 112^3 / 100 x 100 x 1000
// 0.93 / 0.81 / 0.76x torch, once per thread 1.04 / 0.95 / 0.96x). Portable tier forced here (its vectors are this
// build's 64 bytes), 2 threads, native / torch fp32: 96^3 0.59 -> 1.20, 128^3 0.80 -> 1.14, 64 x 256 x 256 0.47 ->
// 1.11, 24 x 1024 x 128 0.38 -> 1.08; linear 96^3 0.57 -> 0.90, 64 x 256 x 256 0.41 -> 0.82 (before the swap below).
constexpr int64_t kInPlaceMaxK = 1024;
// Up to this many row panels A and B may take all of L2 (more: a sixth). C++ driver, 2 threads, limits of 16 and 7
// panels alternated (best-worst of 5 rounds, two runs, us): 100 x 100 x 1000 (8 panels) 66-74 / 78-82, linear
// 128 x 512 x 512 181-189 / 204-206 and 200 x 300 x 800 250-259 / 290-293; gemm 128 x 512 x 512, 160 x 400 x 600,
// 112 x 1024 x 256 and 200 x 300 x 800 level within the noise. Raised from 16 (twenty-sixth session; Python, prepared
// calls against torch in turns, 2 threads, builds alternated twice, us, avx512 / portable tier): to 19, 256^3 122-125 /
// 142-143 -> 125-126 / 120-122, linear 256 x 1024 x 256 580-608 / 608-614 -> 460-470 / 485-503, 256 x 256 x 512
// 251-254 / 280-296 -> 226-234 / 229-241; to 28, 320^3 238-249 / 270-280 -> 220-230 / 225-232, 384^3 396-419 /
// 442-455 -> 365-384 / 371-387 (linear level on avx512); to 40, 448^3 619-648 / 700-701 -> 573-585 / 598-619, 512^3
// 954-958 / 1043-1057 -> 945-951 / 983-993, linear 448^3 633-646 / 724-733 -> 619-630 / 665-675.
constexpr int64_t kInPlaceL2Panels = 40;
// From this many FLOPs (not kSerialFlops) the in-place path takes threads when each gets >= 3 row panels. C++ driver,
// 2 threads against 1, alternated (us): 72^3 4.3 / 4.7-5.3, 96^3 7.4-7.7 / 9.7, 128 x 64 x 64 4.6-5.0 / 5.7,
// 200 x 16 x 64 4.3-4.5 / 4.7, 84 x 48 x 64 3.6-3.8 / 3.8, 84 x 32 x 64 (0.34 MFLOP) 2.5-2.7 / 1.9; with fewer
// row panels (items sharing a row panel's columns) 64 x 96 x 96 6.5 / 5.8, 32 x 128 x 128 6.5 / 5.6. Measured again
// in Python (prepared calls, 2 threads, the builds alternated three times; twenty-sixth session) those take threads
// from kFewRowsThreadFlops: 64 x 96 x 96 7.4-7.8 -> 6.4-7.0 us, 32 x 128 x 128 6.4-6.7 -> 5.6-6.1, 8 x 256 x 256
// 6.8-7.2 -> 5.8-6.4, 12 x 256 x 256 9.9-10.5 -> 8.1-8.2, 8 x 1024 x 64 7.9-8.3 -> 6.3-6.5 (portable tier alike).
constexpr double kInPlaceThreadFlops = 0.6e6;
// Linear with N at least this many times M, on a policy without pack_t: C^T = B . A^T (see gemm_in_place). C++
// driver, forced portable tier, 2 threads, not swapped / swapped (best-worst of 5 rounds, us): 24 x 1024 x 128
// 49.7-50.5 / 39.9-42.4, 64 x 512 x 256 77.0-78.8 / 59.9-64.6, 32 x 512 x 512 95.2-96.7 / 60.6-62.8; at N = 4 M
// (100 x 400 x 300) 96.0-96.9 / 100.8-104.7. The AVX-512 tier's fast pack_t keeps B transposed: swapped there, Python
// ratios against torch in turns, 24 x 1024 x 128 1.01 -> 0.88-0.93, 64 x 512 x 256 1.00 -> 0.93-0.95, 32 x 512 x 512
// 1.40 -> 1.63.
constexpr int64_t kInPlaceSwapN = 8;
template <class P> bool in_place_gemm(const GemmParams& p) {
  const int64_t max_bytes = cdiv(p.M, P::MR) <= kInPlaceL2Panels ? caches().l2 : caches().l2 / 6;
  return p.K <= kInPlaceMaxK && (p.M * p.K + p.K * p.N) * int64_t(sizeof(float)) <= max_bytes;
}
// From this many rows up to direct_two_pass_max_m() a GEMM (B [K, N]) whose B takes at most a quarter of L2 runs in
// place instead of on the direct path, whose partials (loaded and stored every 8 rows of B) and M x 8 broadcasts
// make it load-bound once B is in cache. Sapphire Rapids VM, 2 threads, prepared calls, direct -> in place (us), B
// warm: 4 x 256 x 256 5.3-6.4 -> 4.1-4.3, 6 x 256 x 256 7.7 -> 5.0, 8 x 128 x 128 2.8 -> 1.7, 16 x 256 x 256 15.2 ->
// 8.3, 8 x 256 x 512 15 -> 9.4, 8 x 128 x 1024 16 -> 8, 12 x 100 x 1000 18.4 -> 11.5; B cold (copies rotating
// through 512 MB) 4 / 6 / 8 / 16 x 256 x 256 22.0 / 24.1 / 25.8 / 23.4 -> 22.7 / 24.3 / 26.9 / 25.6, 8 x 256 x 512
// 32 -> 37, 8 x 128 x 1024 33 -> 35, 12 x 100 x 1000 33-36 -> 36-39. Past a quarter of L2 in place is still 1.3-1.8x
// faster warm but 25-45% slower cold (8 x 512 x 512 56 -> 71-75, 16 x 384 x 384 46 -> 62: the direct path streams
// whole rows of B), so the direct path keeps those; M = 2 / 3 gain nothing warm and lose cold.
constexpr int64_t kInPlaceMinM = 4;
// Linear (B [N, K]) from kDotMaxM / 2 + 1 rows with K at most this many times M runs in place (B's panels
// transposed) rather than on the dot path, whose horizontal sums (one per output, R = 2 from 5 rows) outweigh the
// K / 16 FMAs of an output at short K. Sapphire Rapids VM, 2 threads, prepared calls, dot -> in place (us): 6 x 1024
// x 64 15.3 -> 11.5-11.8, 8 x 1024 x 64 18-22 -> 13.1-13.5, 8 x 1024 x 96 26 -> 20-21, 16 x 1024 x 64 24 -> 16, 12 x
// 2048 x 64 40-44 -> 30-31, 16 x 64 x 64 2.5 -> 1.4, 12 x 256 x 128 10.9 -> 7.8-8.2, 16 x 1024 x 128 36-37 -> 28-32;
// past it the transposes cost more than the sums save: 8 x 1024 x 128 18.9 -> 19.6-20.2, 8 x 512 x 192 18.5 ->
// 19.6-22.9, 8 x 256 x 256 10.5 -> 14.2, 12 x 100 x 1000 19 -> 20-21.
constexpr int64_t kInPlaceLinearKPerRow = 12;
inline bool in_place_small_b(const GemmParams& p) {  // A (<= 16 rows of K <= 1024) fits beside B: in_place_gemm holds
  return p.K <= kInPlaceMaxK && p.K * p.N * int64_t(sizeof(float)) <= caches().l2 / 4;
}
template <class P, bool Full, size_t... I> constexpr auto in_place_table(std::index_sequence<I...>) {
  return std::array{&P::template tile_in_place<static_cast<int>(I) + 1, Full>...};
}
template <class P, size_t... I> constexpr auto a_in_place_table(std::index_sequence<I...>) {
  return std::array{&P::template tile_a_in_place<static_cast<int>(I) + 1>...};
}
template <class P> void gemm_in_place(const GemmParams& p) {
  constexpr int64_t MR = P::MR, NR = P::NR;
  static constexpr auto full = in_place_table<P, true>(std::make_index_sequence<MR>());
  static constexpr auto packed = a_in_place_table<P>(std::make_index_sequence<MR>());
  const int64_t M = p.M, N = p.N, K = p.K;
  const float* A = static_cast<const float*>(p.a);
  const float* B = static_cast<const float*>(p.b);
  // B [N, K] on a policy that transposes element by element (pack_bt: no pack_t) with N >= kInPlaceSwapN M: the roles
  // swap, C^T = B . A^T (below).
  const bool swap = p.transb && !HasPackT<P, float>::value && N >= kInPlaceSwapN * M;
  const int64_t mp = cdiv(M, MR), np = cdiv(N, NR), xp = swap ? cdiv(N, MR) : mp;  // xp: row panels of the tiles
  auto row0 = [&](int64_t i) { return M * i / mp; };  // panel i: rows [row0(i), row0(i+1)), <= MR rows
  // Threads from kInPlaceThreadFlops when every thread gets 3 row panels or more; with fewer, from
  // kFewRowsThreadFlops (items that share a row panel's columns; see kInPlaceThreadFlops).
  int nt = xp >= 3 * int64_t(omp_get_max_threads()) ? pick_threads(p, kInPlaceThreadFlops)
                                                       : few_rows_threads(p, mp * np);
  const Out o{static_cast<float*>(p.c), N, nullptr, 0, false, false};
  if (p.transb) {
    // Column panels outer: each item transposes its panel of B [N, K] (kept while the thread's next item shares it),
    // then runs its row panels with A in place; swapped, B's rows are read in place and A (M x K) is transposed instead
    // of B (N x K), each tile of C^T going through a small buffer into C.
    const float* X = swap ? B : A;  // read in place
    const float* Y = swap ? A : B;  // transposed into panels
    const int64_t XM = swap ? N : M, YN = swap ? M : N, yp = cdiv(YN, NR);
    auto xrow0 = [&](int64_t i) { return XM * i / xp; };
    const int64_t nrg = std::min(xp, cdiv(3 * int64_t(nt), yp)), items = yp * nrg;
    nt = static_cast<int>(std::min<int64_t>(nt, items));
    float* C = static_cast<float*>(p.c);
    run_team(nt, [&](int, int, Team& team) {
      const CallBuffer panel(arena(), size_t(K * NR + MR * NR) * sizeof(float));
      float* bp = panel.as<float>();
      float* t = bp + K * NR;  // a tile of C^T
      const Out ot{t, NR, nullptr, 0, false, false};
      int64_t have = -1;  // the panel in bp
      for (int64_t it; (it = team.grab()) < items;) {
        const int64_t j = it / nrg, rg = it % nrg;
        const int nc = static_cast<int>(std::min(NR, YN - j * NR));
        if (j != have) pack_b_any<P, float>(true, Y, YN, K, 0, j * NR, K, 0, K, nc, bp);
        have = j;
        for (int64_t i = xp * rg / nrg; i < xp * (rg + 1) / nrg; ++i) {
          const int64_t r0 = xrow0(i), R = xrow0(i + 1) - r0;
          if (!swap) {
            packed[R - 1](X + r0 * K, K, bp, K, o, r0, j * NR, nc);
            continue;
          }
          packed[R - 1](X + r0 * K, K, bp, K, ot, 0, 0, nc);
          for (int64_t c = 0; c < nc; ++c)  // column c of the tile of C^T = R consecutive values of C's row j NR + c
            for (int64_t r = 0; r < R; ++r) C[(j * NR + c) * N + r0 + r] = t[r * NR + c];
        }
      }
      team.barrier();
    });
    return;
  }
  const int64_t ncg = std::min(np, cdiv(3 * int64_t(nt), mp)), items = mp * ncg;
  nt = static_cast<int>(std::min<int64_t>(nt, items));
  run_team(nt, [&](int, int, Team& team) {
    const CallBuffer panel(arena(), P::kInPlaceMasked ? 0 : size_t(K * NR) * sizeof(float));
    bool tail_packed = false;  // the narrower last panel of B (np - 1), packed [k][NR] once per thread
    for (int64_t it; (it = team.grab()) < items;) {
      const int64_t i = it / ncg, cg = it % ncg, r0 = row0(i);
      const int R = static_cast<int>(row0(i + 1) - r0);
      for (int64_t j = np * cg / ncg; j < np * (cg + 1) / ncg; ++j) {
        const int nc = static_cast<int>(std::min(NR, N - j * NR));
        if (nc == NR) {
          full[R - 1](A + r0 * K, K, B + j * NR, N, K, o, r0, j * NR, nc);
        } else if constexpr (P::kInPlaceMasked) {
          static constexpr auto part = in_place_table<P, false>(std::make_index_sequence<MR>());
          part[R - 1](A + r0 * K, K, B + j * NR, N, K, o, r0, j * NR, nc);
        } else {
          if (!tail_packed) pack_b_any<P, float>(false, B, N, K, 0, j * NR, K, 0, K, nc, panel.as<float>());
          tail_packed = true;
          packed[R - 1](A + r0 * K, K, panel.as<float>(), K, o, r0, j * NR, nc);
        }
      }
    }
    team.barrier();  // wait here (spin, then sleep), not in the OpenMP join (spin only)
  });
}

#if defined(__aarch64__)
// ---- NEON policy (tier "neon", aarch64) ------------------------------------------------------------
// 8 x 12 fp32 micro-tile: 24 accumulators (q registers of 4 floats) + 3 of B + 2 of A = 29 of the 32
// vector registers. Each k step: 3 loads of B, 2 loads of A (8 rows; shorter tiles broadcast each row's
// value with ld1r), 24 fmla by element. bf16 is widened to fp32 while packing (PlainPack); aarch64 has
// no bf16 multiply-add before ARMv8.6 (BFDOT / BFMMLA), so this tier does not assume one.
// Verified for correctness only (cross-compiled, run under qemu-aarch64 by tools/cpu_harness): never
// timed on ARM hardware.
struct F32Neon : PlainPack<12> {
  using Elem = float;
  using TileFn = void (*)(const float*, const float*, int64_t, const Out&, int64_t, int64_t, int);
  static constexpr int64_t MR = 8, NR = 12, KG = 1, KC = 256, NC = 512;
  static_assert(MR * NR / 4 + NR / 4 + 2 <= 32, "accumulators + B + A must fit the 32 vector registers");

  template <int R> static void tile_r(const float* a, const float* b, int64_t kcu, const Out& o, int64_t row,
                                      int64_t col, int nc) {
    float32x4_t acc[R][3];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < kcu; ++k) {
      const float* bk = b + k * NR;
      const float32x4_t b0 = vld1q_f32(bk), b1 = vld1q_f32(bk + 4), b2 = vld1q_f32(bk + 8);
      if constexpr (R == 8) {
        const float32x4_t a0 = vld1q_f32(a + k * 8), a1 = vld1q_f32(a + k * 8 + 4);
        fma_row<0>(acc[0], b0, b1, b2, a0);
        fma_row<1>(acc[1], b0, b1, b2, a0);
        fma_row<2>(acc[2], b0, b1, b2, a0);
        fma_row<3>(acc[3], b0, b1, b2, a0);
        fma_row<0>(acc[4], b0, b1, b2, a1);
        fma_row<1>(acc[5], b0, b1, b2, a1);
        fma_row<2>(acc[6], b0, b1, b2, a1);
        fma_row<3>(acc[7], b0, b1, b2, a1);
      } else {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const float32x4_t av = vld1q_dup_f32(a + k * R + r);
          acc[r][0] = vfmaq_f32(acc[r][0], b0, av);
          acc[r][1] = vfmaq_f32(acc[r][1], b1, av);
          acc[r][2] = vfmaq_f32(acc[r][2], b2, av);
        }
      }
    }
    if (nc == NR && !o.to_bf16) {  // full fp32 tile: vector loads and stores of C
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        float* c = o.at(row + r, col);
#pragma GCC unroll 3
        for (int v = 0; v < 3; ++v) vst1q_f32(c + 4 * v, o.acc ? vaddq_f32(acc[r][v], vld1q_f32(c + 4 * v)) : acc[r][v]);
      }
      return;
    }
    float t[R][NR];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < 3; ++v) vst1q_f32(&t[r][4 * v], acc[r][v]);
    store_tile<R, NR>(t, o, row, col, nc);
  }

 private:
  template <int L>
  static inline void fma_row(float32x4_t (&c)[3], float32x4_t b0, float32x4_t b1, float32x4_t b2, float32x4_t a) {
    c[0] = vfmaq_laneq_f32(c[0], b0, a, L);
    c[1] = vfmaq_laneq_f32(c[1], b1, a, L);
    c[2] = vfmaq_laneq_f32(c[2], b2, a, L);
  }
};
#endif  // __aarch64__

// Portable direct path for small M: C rows accumulate in a chunk buffer, B rows are streamed.
template <class Src> void gemm_direct_portable(const GemmParams& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const Src* A = static_cast<const Src*>(p.a);
  const Src* B = static_cast<const Src*>(p.b);
  const int64_t groups = cdiv(N, 16);
  const int nt = static_cast<int>(std::min<int64_t>(few_rows_threads(p, groups), groups));
  run_team(nt, [&](int t, int nt, Team& team) {
    const int64_t n0 = std::min(N, groups * t / nt * 16), n1 = std::min(N, groups * (t + 1) / nt * 16);
    constexpr int64_t kChunk = 2048;  // M x chunk floats of C, twice: 16 KB, half of a typical L1
    alignas(64) float buf[kChunk], tmp[kChunk];
    const int64_t cw = kChunk / M;
    constexpr int64_t L = pv::kLanes;
    for (int64_t j0 = n0; j0 < n1; j0 += cw) {
      const int64_t w = std::min(cw, n1 - j0);
      // bf16: the first wp columns of the chunk go in blocks of 2 L, each row's block split into its even and odd
      // columns in registers (pv::load_bf16_pairs), so C's block is kept as [even | odd] until it is written
      const int64_t wp = std::is_same_v<Src, u16> ? w / (2 * L) * (2 * L) : 0;
      const auto at = [&](int64_t j) { return j < wp ? pv::pair_pos(j) : j; };
      std::fill(buf, buf + M * w, 0.f);
      for (int64_t k0 = 0; k0 < K; k0 += kDirectRows) {  // blocks of K summed apart: K/64 + 64 adds
        std::fill(tmp, tmp + M * w, 0.f);
        const int64_t k1 = std::min(K, k0 + kDirectRows);
        for (int64_t k = k0; k < k1; k += 4) {  // 4 rows of B per pass over the chunk of C (fewer at the end)
          const int64_t nr = std::min<int64_t>(4, k1 - k);
          const Src* b0 = B + k * N + j0;
          for (int64_t m = 0; m < M; ++m) {
            float a[4] = {};
            for (int64_t r = 0; r < nr; ++r) a[r] = Portable::ld(A, m * K + k + r);
            float* c = tmp + m * w;
            int64_t j = 0;
            if (nr == 4) {
              if constexpr (std::is_same_v<Src, u16>) {
                for (; j < wp; j += 2 * L) {
                  pv::vf ev[4], od[4];
                  for (int r = 0; r < 4; ++r) pv::load_bf16_pairs(b0 + r * N + j, ev[r], od[r]);
                  pv::store(c + j, pv::load(c + j) + ev[0] * a[0] + ev[1] * a[1] + ev[2] * a[2] + ev[3] * a[3]);
                  pv::store(c + j + L, pv::load(c + j + L) + od[0] * a[0] + od[1] * a[1] + od[2] * a[2] + od[3] * a[3]);
                }
              } else {
                for (; j + L <= w; j += L) {
                  pv::vf x = pv::load(c + j) + pv::load(b0 + j) * a[0];
                  x += pv::load(b0 + N + j) * a[1];
                  x += pv::load(b0 + 2 * N + j) * a[2];
                  x += pv::load(b0 + 3 * N + j) * a[3];
                  pv::store(c + j, x);
                }
              }
            }
            for (; j < w; ++j)
              for (int64_t r = 0; r < nr; ++r) c[at(j)] += a[r] * Portable::ld(b0 + r * N, j);
          }
        }
        for (int64_t i = 0; i < M * w; ++i) buf[i] += tmp[i];
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < w; ++j) {
          const float v = buf[m * w + at(j)];
          if constexpr (std::is_same_v<Src, float>) {
            static_cast<float*>(p.c)[m * N + j0 + j] = v;
          } else {
            static_cast<u16*>(p.c)[m * N + j0 + j] = float_to_bf16(v);
          }
        }
    }
    team.barrier();
  });
}

// ---- small-M linear (B stored [N, K]: pk.linear at decode sizes, M <= kDotMaxM) ---------------------------
// Each output is the dot product of a row of A and a row of B, both contiguous in K, so B is streamed
// exactly once, row after row, with nothing packed and no partial sums to combine: a thread takes blocks
// of kDotRows rows of B (dynamically) and writes those columns of C itself. R rows of B at a time share
// each load of A; M x R accumulators stay in the vector registers (AVX-512: R = 4 up to M = 4, else 2, of
// 32 zmm; NEON: 16 q registers of accumulators, R = 8 / 4 / 2 up to M = 2 / 4 / 8).
constexpr int64_t kDotMaxM = 8;
constexpr int64_t kDotRows = 32;
template <class T> using DotFn = void (*)(const T* A, const T* B, int64_t K, int64_t N, int64_t n0, int64_t n1, T* C);

template <class T> inline void store_out(T* c, float v) {
  if constexpr (std::is_same_v<T, float>) {
    *c = v;
  } else {
    *c = float_to_bf16(v);
  }
}

// The dot path's threads: blocks of kDotRows rows of B handed out dynamically. Each block is multiplied by
// the rows of A in passes of at most kDotMaxM rows, kernel(m) computing m rows of A against rows [n0, n1) of
// B into those columns of C; the later passes read the block from L2 (32 rows: 512 KB at K = 4096 fp32).
template <class T, class Kernel> void run_dot(const GemmParams& p, Kernel kernel) {
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  T* C = static_cast<T*>(p.c);
  const int64_t M = p.M, N = p.N, K = p.K, items = cdiv(N, kDotRows);
  const DotFn<T> full = kernel(std::min(M, kDotMaxM)), last = kernel(M - (cdiv(M, kDotMaxM) - 1) * kDotMaxM);
  ContentionGuard guard(g_solo_direct, static_cast<int>(std::min<int64_t>(few_rows_threads(p, items), items)));
  run_team(guard.threads(), [&](int t, int, Team& team) {
    for (int64_t it; (it = team.grab()) < items;) {
      const int64_t n0 = it * kDotRows, n1 = std::min(N, (it + 1) * kDotRows);
      for (int64_t m0 = 0; m0 < M; m0 += kDotMaxM)
        (m0 + kDotMaxM < M ? full : last)(A + m0 * K, B, K, N, n0, n1, C + m0 * N);
    }
    guard.body_done(t);
  });
}

// Portable dot path (plain C++ on the build's vectors, vec_portable.h): the tier's linear up to kDotPortableMaxM
// rows, which otherwise packed (transposed) all of B per call, GEMV-like shapes included (aarch64 has its NEON one).
// kLanes K values (bf16: 2 kLanes) of R rows of B per step; the lanes are summed once per output, the last K % step
// values added in scalar. R = 4 / 2 / 1 up to M = 2 / 4 / 8 keeps the M x R accumulators, R of B and one of A within
// 16 vector registers (SSE / AVX2 builds).
template <class T, int M, int R>
void dot_rows_portable(const T* A, const T* B, int64_t K, int64_t N, int64_t n0, int64_t n1, T* C) {
  constexpr int64_t step = std::is_same_v<T, float> ? pv::kLanes : 2 * pv::kLanes;
  const int64_t KV = K / step * step;
  for (int64_t n = n0; n < n1; n += R) {
    const int r = static_cast<int>(std::min<int64_t>(R, n1 - n));
    const T* b[R];
    for (int j = 0; j < R; ++j) b[j] = B + (n + std::min(j, r - 1)) * K;  // a short block repeats its last row
    pv::vf acc[M][R];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[m][j] = pv::vf{};
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t k = 0; k < KV; k += pv::kLanes) {
        pv::vf bv[R];
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) bv[j] = pv::load(b[j] + k);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const pv::vf av = pv::load(A + m * K + k);
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) acc[m][j] += av * bv[j];
        }
      }
    } else {  // bf16: 2 kLanes values a step, split into even and odd ones by a shift and a mask (the lane sums of a
              // dot product do not care which K lands in which lane)
      for (int64_t k = 0; k < KV; k += 2 * pv::kLanes) {
        pv::vf be[R], bo[R];
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) pv::load_bf16_pairs(b[j] + k, be[j], bo[j]);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          pv::vf ae, ao;
          pv::load_bf16_pairs(A + m * K + k, ae, ao);
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) acc[m][j] += ae * be[j] + ao * bo[j];
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) {
        float v = pv::hsum(acc[m][j]);
        for (int64_t k = KV; k < K; ++k) v += PlainPack<1>::ld(A, m * K + k) * PlainPack<1>::ld(b[j], k);
        store_out(C + m * N + n + j, v);
      }
  }
}
// Up to this many rows (run_dot: passes of kDotMaxM). Forced portable tier on the Sapphire Rapids VM (64-byte
// vectors), 2 threads, prepared calls, the packed / in-place paths -> dot (us): fp32 M = 1 / 4 / 5 / 8 / 12 / 16 x 4096
// x 4096 7123 / 6954 / 7768 / 7844 / 9018 / 10673 -> 1296 / 1525 / 2516 / 2805 / 4078 / 6233 (torch 1393-1470 at M =
// 1), 8 x 256 x 256 26.2 -> 13.6, 16 x 256 x 256 26.4 -> 16.6, 12 x 1024 x 256 75 -> 48; bf16 M = 1 / 4 / 8 / 16 x 4096
// x 4096 4315 / 4619 / 5754 / 6860 -> 696 / 1157 / 2536 / 4989. At M = 24-32 mixed (24 x 4096 x 4096 11.4 -> 8.8 ms,
// but 32 x 1024 x 64 32 -> 58 us, 32 x 512 x 512 74 -> 102).
constexpr int64_t kDotPortableMaxM = 2 * kDotMaxM;
template <class T, size_t... I> constexpr auto dot_table_portable(std::index_sequence<I...>) {
  return std::array<DotFn<T>, sizeof...(I)>{
      &dot_rows_portable<T, static_cast<int>(I) + 1, (I < 2 ? 4 : I < 4 ? 2 : 1)>...};
}
template <class T> void gemm_dot_portable(const GemmParams& p) {
  static constexpr auto dot = dot_table_portable<T>(std::make_index_sequence<kDotMaxM>());
  run_dot<T>(p, [](int64_t m) { return dot[m - 1]; });
}

#if defined(__aarch64__)
// NEON dot path: 4 K values per q register; the lanes are summed once per output at the end, and the
// last K % 4 values are added in scalar.
using neon::load4;

template <class T, int M, int R> void dot_rows_neon(const T* A, const T* B, int64_t K, int64_t N, int64_t n0, int64_t n1, T* C) {
  const int64_t K4 = K / 4 * 4;
  for (int64_t n = n0; n < n1; n += R) {
    const int r = static_cast<int>(std::min<int64_t>(R, n1 - n));
    const T* b[R];
    for (int j = 0; j < R; ++j) b[j] = B + (n + std::min(j, r - 1)) * K;  // a short block repeats its last row
    float32x4_t acc[M][R];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[m][j] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < K4; k += 4) {
      float32x4_t bv[R];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) bv[j] = load4(b[j] + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const float32x4_t av = load4(A + m * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) acc[m][j] = vfmaq_f32(acc[m][j], av, bv[j]);
      }
    }
    float sums[M][R];  // lane sums with constant indices first: acc stays in registers through the loop
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) sums[m][j] = vaddvq_f32(acc[m][j]);
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) {
        float v = sums[m][j];
        for (int64_t k = K4; k < K; ++k) v += PlainPack<1>::ld(A, m * K + k) * PlainPack<1>::ld(b[j], k);
        store_out(C + m * N + n + j, v);
      }
  }
}

template <class T, size_t... I> constexpr auto dot_table_neon(std::index_sequence<I...>) {
  return std::array<DotFn<T>, sizeof...(I)>{&dot_rows_neon<T, static_cast<int>(I) + 1, (I < 2 ? 8 : I < 4 ? 4 : 2)>...};
}

template <class T> void gemm_dot_neon(const GemmParams& p) {
  static constexpr auto dot = dot_table_neon<T>(std::make_index_sequence<kDotMaxM>());
  run_dot<T>(p, [](int64_t m) { return dot[m - 1]; });
}

// NEON direct path for M <= kDirectMaxM (B stored [K, N]): items of kDirectNeonCols columns go to the
// threads dynamically; per item the M rows of C accumulate in an fp32 partial in L1 while B streams past
// 4 rows at a time (4 contiguous runs), each q register of B feeding M fmla by element (the 4 K values of
// a row of A in one register). Nothing is packed; every element of B is read once.
constexpr int64_t kDirectNeonCols = 512;
template <int M, class Src>
void direct_rows_neon(const Src* A, const Src* B, int64_t K, int64_t N, int64_t j0, int64_t w, Src* C) {
  float part[M][kDirectNeonCols];
  for (int m = 0; m < M; ++m) std::fill(part[m], part[m] + w, 0.f);
  const int64_t w4 = w / 4 * 4;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    float32x4_t a[M];
    for (int m = 0; m < M; ++m) {
      float t[4];
      for (int u = 0; u < 4; ++u) t[u] = PlainPack<1>::ld(A, m * K + k + u);
      a[m] = vld1q_f32(t);
    }
    const Src* b = B + k * N + j0;
    for (int64_t j = 0; j < w4; j += 4) {
      const float32x4_t b0 = load4(b + j), b1 = load4(b + N + j), b2 = load4(b + 2 * N + j), b3 = load4(b + 3 * N + j);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        float32x4_t c = vld1q_f32(part[m] + j);
        c = vfmaq_laneq_f32(c, b0, a[m], 0);
        c = vfmaq_laneq_f32(c, b1, a[m], 1);
        c = vfmaq_laneq_f32(c, b2, a[m], 2);
        c = vfmaq_laneq_f32(c, b3, a[m], 3);
        vst1q_f32(part[m] + j, c);
      }
    }
    for (int64_t j = w4; j < w; ++j)
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < 4; ++u) part[m][j] += PlainPack<1>::ld(A, m * K + k + u) * PlainPack<1>::ld(b + u * N, j);
  }
  for (; k < K; ++k)  // the last K % 4 rows of B
    for (int m = 0; m < M; ++m) {
      const float av = PlainPack<1>::ld(A, m * K + k);
      for (int64_t j = 0; j < w; ++j) part[m][j] += av * PlainPack<1>::ld(B + k * N + j0, j);
    }
  for (int m = 0; m < M; ++m)
    for (int64_t j = 0; j < w; ++j) store_out(C + m * N + j0 + j, part[m][j]);
}

template <class Src> void gemm_direct_neon(const GemmParams& p) {
  using Fn = void (*)(const Src*, const Src*, int64_t, int64_t, int64_t, int64_t, Src*);
  static constexpr Fn rows[] = {&direct_rows_neon<1, Src>, &direct_rows_neon<2, Src>, &direct_rows_neon<3, Src>,
                                &direct_rows_neon<4, Src>};
  static_assert(sizeof(rows) / sizeof(rows[0]) == kDirectMaxM, "one kernel per row count");
  const Src* A = static_cast<const Src*>(p.a);
  const Src* B = static_cast<const Src*>(p.b);
  Src* C = static_cast<Src*>(p.c);
  const int64_t N = p.N, K = p.K, items = cdiv(N, kDirectNeonCols);
  const Fn kernel = rows[p.M - 1];
  ContentionGuard guard(g_solo_direct, static_cast<int>(std::min<int64_t>(pick_threads(p), items)));
  run_team(guard.threads(), [&](int t, int, Team& team) {
    for (int64_t it; (it = team.grab()) < items;) {
      const int64_t j0 = it * kDirectNeonCols;
      kernel(A, B, K, N, j0, std::min(kDirectNeonCols, N - j0), C);
    }
    guard.body_done(t);
  });
}
#endif  // __aarch64__

#if defined(PK_X86)
// =====================================================================================================
// AVX-512
// =====================================================================================================
// pack_b reads rows of B that are runs of 2-8 KB at a stride of N; the hardware prefetcher restarts
// on every row, so pack_b also prefetches the same run 2 rows ahead (prefetches never fault, past the
// end of B included). Its gain was within this VM's noise (<10%); it costs one instruction per line.
constexpr int64_t kPackPrefetchRows = 2;
// pack_b writes each panel as a sequential stream; it packs kPackPanels panels (512 columns) over all
// its rows, then the next ones, so that at most 16 write streams are open at a time (all of a 2048-wide
// B at once was 64). Zen 5, 2 threads, bf16 2048 x 2048 from DRAM (scratch loop, best of 40): 64 panels
// 0.23 ms, 8 0.17, 16 0.135-0.145, 32 0.22; in a 2048^3 GEMM (perf) packing 5.5 -> 4.7% of the samples.
constexpr int64_t kPackPanels = 16;
using vec::bf16_rne_hi;
using vec::load_bf16;
using vec::mask16;
using vec::mask32;
using vec::store_bf16;

// Stores an R x 32 tile of accumulators (acc[r][0] = columns 0..15, acc[r][1] = 16..31).
template <int R> PK_AVX512 inline void store_tile(__m512 (&acc)[R][2], const Out& o, int64_t row, int64_t col, int nc) {
  const __mmask16 m0 = mask16(nc), m1 = mask16(nc - 16);
#pragma GCC unroll 14
  for (int r = 0; r < R; ++r) {
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (o.acc) {
      const float* f = o.at(row + r, col);
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, f));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, f + 16));
    }
    if (o.to_bf16) {
      u16* h = o.h + (row + r) * o.ldh + col;
      store_bf16(h, v0, nc);
      store_bf16(h + 16, v1, nc - 16);
    } else {
      float* f = o.at(row + r, col);
      _mm512_mask_storeu_ps(f, m0, v0);
      _mm512_mask_storeu_ps(f + 16, m1, v1);
    }
  }
}

// Loads up to 32 source elements (nc of them, the rest zero) as two fp32 vectors.
PK_AVX512 inline void load32_f32(const float* s, int64_t nc, __m512& lo, __m512& hi) {
  lo = _mm512_maskz_loadu_ps(mask16(nc), s);
  hi = _mm512_maskz_loadu_ps(mask16(nc - 16), s + 16);
}
PK_AVX512 inline void load32_f32(const u16* s, int64_t nc, __m512& lo, __m512& hi) {
  lo = load_bf16(s, nc);
  hi = load_bf16(s + 16, nc - 16);
}
// One 64-byte line of a packed panel (64-byte aligned): a non-temporal store when the packing streams (a B packed
// once past the private copies; the packer's _mm_sfence makes the lines visible before its barrier).
PK_AVX512 inline void put_line(void* d, __m512i v, bool stream) {
  if (stream) _mm512_stream_si512(static_cast<__m512i*>(d), v);
  else _mm512_store_si512(d, v);
}
PK_AVX512 inline void put_line(float* d, __m512 v, bool stream) {
  put_line(static_cast<void*>(d), _mm512_castps_si512(v), stream);
}

template <class Src> PK_AVX512 void reduce_row_avx512(const float* parts, int64_t stride, int nt, int64_t n, Src* c) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    __m512 v = _mm512_maskz_loadu_ps(m, parts + j);
    for (int t = 1; t < nt; ++t) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, parts + t * stride + j));
    if constexpr (std::is_same_v<Src, float>) {
      _mm512_mask_storeu_ps(c + j, m, v);
    } else {
      store_bf16(c + j, v, n - j);
    }
  }
}

// ---- fp32 policy: 14 x 32 micro-tile, 28 zmm accumulators + 2 B vectors + 1 broadcast = 31 of 32 zmm.
// Each k step: 2 loads of B, 14 broadcasts, 28 FMAs (Zen 4: 1 zmm FMA/cycle, so 28 cycles, loads idle).
struct F32Avx512 {
  using Elem = float;
  using TileFn = void (*)(const float*, const float*, int64_t, const Out&, int64_t, int64_t, int);
  // KC 256: the A micro-panel (14 x 256 x 4 = 14 KB) stays in L1 while the B block streams from L2;
  // NC 512: the B block (256 x 512 x 4 = 512 KB) fits in the 1 MB L2.
  static constexpr int64_t MR = 14, NR = 32, KG = 1, KC = 256, NC = 512;
  static_assert(MR * 2 + 3 <= 32, "accumulators + B + broadcast must fit the 32 zmm registers");
  static_assert(KC * MR * 4 <= 16 * 1024, "A micro-panel should take at most half of a 32 KB L1");
  static_assert(KC * NC * 4 <= 512 * 1024, "B block should take at most half of a 1 MB L2");
  // The B micro-panel (KC x 32, 32 KB) streams from L2 once per tile, two lines per k step; the L1
  // prefetchers left the FMAs on B's second line waiting (perf annotate: the most samples). A software
  // prefetch of both lines this many steps ahead, Sapphire Rapids VM, fp32 (scratch driver calling
  // pk::cpu::gemm in a loop, best of 6-8; steps 0 / 4 / 8 / 12 / 16 / 20 / 24 / 32): 2048^3 1 thread
  // 117-125 / 118-120 / 117-119 / 107-112 / 106-112 / 107-113 / 111-113 / 116 ms; 16 on 2 threads:
  // 2048^3 61-64 -> 55 ms, 1024^3 6.8-7.1 -> 6.4-6.5 ms, 512^3 and 256^3 and 128 x 4096 x 4096 unchanged.
  // (notes/cpu_gemm.md: an earlier try, 4-32 steps ahead, had measured no change beyond the noise.) That is
  // kBPrefetchSteps (above Portable, which uses it too).

  // R (<= 14) rows x kc of A -> dst[k][R]: 16 K values of every row at a time, transposed in registers
  // (vec::transpose16; a scalar loop was ~4 us of a 30 us 128^3 GEMM on Sapphire Rapids).
  template <class Src> PK_AVX512 static void pack_a(const Src* src, int64_t lda, int R, int64_t kc, float* dst) {
    const __mmask16 rows = vec::mask16(R);
    for (int64_t k0 = 0; k0 < kc; k0 += 16) {
      const int64_t n = std::min<int64_t>(16, kc - k0);
      const __mmask16 m = vec::mask16(n);
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        if (r >= R) {
          v[r] = _mm512_setzero_si512();
        } else if constexpr (std::is_same_v<Src, float>) {
          v[r] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, src + r * lda + k0));
        } else {
          v[r] = _mm512_castps_si512(vec::load_bf16(src + r * lda + k0, n));
        }
      }
      vec::transpose16(v);
      for (int64_t c = 0; c < n; ++c) _mm512_mask_storeu_ps(dst + (k0 + c) * R, rows, _mm512_castsi512_ps(v[c]));
    }
  }
  // pack_bt's panels from B stored [N, K] (ldb apart): 16 K values of 16 columns at a time, transposed in registers
  // as pack_a does (pack_bt's scalar loop took ~1 us per 32 x 128 panel).
  template <class Src> PK_AVX512 static void pack_t(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1,
                                                    int64_t nc, float* dst, bool stream) {
    for (int64_t q = 0; q * NR < nc; ++q) {
      float* dq = dst + q * kc * NR;
      const int64_t cols = std::min(NR, nc - q * NR);
      for (int64_t k0 = r0; k0 < r1; k0 += 16) {
        const int64_t n = std::min<int64_t>(16, r1 - k0);
        const __mmask16 m = vec::mask16(n);
        for (int64_t h = 0; h < NR; h += 16) {
          __m512i v[16];
          for (int64_t r = 0; r < 16; ++r) {
            const Src* s = src + (q * NR + h + r) * ldb + k0;
            if (h + r >= cols) {
              v[r] = _mm512_setzero_si512();
            } else if constexpr (std::is_same_v<Src, float>) {
              v[r] = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, s));
            } else {
              v[r] = _mm512_castps_si512(vec::load_bf16(s, n));
            }
          }
          vec::transpose16(v);
          for (int64_t c = 0; c < n; ++c) put_line(dq + (k0 + c) * NR + h, v[c], stream);
        }
      }
    }
    if (stream) _mm_sfence();  // seen by the other threads after the barrier
  }
  template <class Src> PK_AVX512 static void pack_b(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1,
                                                    int64_t nc, float* dst, bool stream) {
    for (int64_t q0 = 0; q0 * NR < nc; q0 += kPackPanels) {
      const int64_t q1 = std::min(q0 + kPackPanels, cdiv(nc, NR));
      for (int64_t k = r0; k < r1; ++k) {
        for (int64_t q = q0; q < q1; ++q) {
          const char* pf = reinterpret_cast<const char*>(src + (k + kPackPrefetchRows) * ldb + q * NR);
          _mm_prefetch(pf, _MM_HINT_T0);
          _mm_prefetch(pf + 64, _MM_HINT_T0);
          __m512 lo, hi;
          load32_f32(src + k * ldb + q * NR, nc - q * NR, lo, hi);
          float* d = dst + (q * kc + k) * NR;
          put_line(d, lo, stream);
          put_line(d + 16, hi, stream);
        }
      }
    }
    if (stream) _mm_sfence();  // seen by the other threads after the barrier
  }
  template <class Src> static void reduce_row(const float* parts, int64_t stride, int nt, int64_t n, Src* c) {
    reduce_row_avx512<Src>(parts, stride, nt, n, c);
  }
  // How a tile reads B's row k: a packed panel (b + k * NR, aligned), or B's rows where they are (b + k * ldb), whole
  // or masked past nc.
  enum class BRow { packed, whole, masked };
  // The tile over K steps: row r's value of A at step k is a[r * ar + k * ak] (packed [k][R]: ar = 1, ak = R; in
  // place: ar = lda, ak = 1); Pf > 0: both lines of B's row Pf steps ahead (past the panel's end: the next tile's
  // panel; a prefetch never faults).
  template <int R, int64_t Pf, BRow BR> PK_AVX512 static inline __attribute__((always_inline)) void tile_k(
      const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb, int64_t K, const Out& o, int64_t row,
      int64_t col, int nc) {
    __m512 acc[R][2];
#pragma GCC unroll 14
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const __mmask16 m0 = mask16(nc), m1 = mask16(nc - 16);
    for (int64_t k = 0; k < K; ++k) {
      if constexpr (Pf > 0) {
        _mm_prefetch(reinterpret_cast<const char*>(b + (k + Pf) * ldb), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + (k + Pf) * ldb + 16), _MM_HINT_T0);
      }
      const float* br = b + k * ldb;
      __m512 b0, b1;
      if constexpr (BR == BRow::packed) {
        b0 = _mm512_load_ps(br);
        b1 = _mm512_load_ps(br + 16);
      } else if constexpr (BR == BRow::whole) {
        b0 = _mm512_loadu_ps(br);
        b1 = _mm512_loadu_ps(br + 16);
      } else {
        b0 = _mm512_maskz_loadu_ps(m0, br);
        b1 = _mm512_maskz_loadu_ps(m1, br + 16);
      }
#pragma GCC unroll 14
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * ar + k * ak]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
    store_tile<R>(acc, o, row, col, nc);
  }
  template <int R> PK_AVX512 static void tile_r(const float* a, const float* b, int64_t kcu, const Out& o,
                                                  int64_t row, int64_t col, int nc) {
    tile_k<R, kBPrefetchSteps, BRow::packed>(a, 1, R, b, NR, kcu, o, row, col, nc);
  }
  static constexpr bool kInPlaceMasked = true;  // tile_in_place<R, false> reads a narrower last panel of B in place
  // gemm_in_place's tiles, all K steps: A where it is (R rows, lda apart) and a packed B panel (B [N, K] transposed, or
  // B's rows where they are (ldb apart; masked past nc unless Full).
  template <int R> PK_AVX512 static void tile_a_in_place(const float* a, int64_t lda, const float* b, int64_t K,
                                                         const Out& o, int64_t row, int64_t col, int nc) {
    tile_k<R, 0, BRow::packed>(a, lda, 1, b, NR, K, o, row, col, nc);
  }
  template <int R, bool Full> PK_AVX512 static void tile_in_place(const float* a, int64_t lda, const float* b,
                                                                  int64_t ldb, int64_t K, const Out& o, int64_t row,
                                                                  int64_t col, int nc) {
    tile_k<R, kInPlacePrefetchSteps, Full ? BRow::whole : BRow::masked>(a, lda, 1, b, ldb, K, o, row, col, nc);
  }
};

// ---- bf16 policy (AVX512_BF16): vdpbf16ps on K-pairs. A Elem is the pair (A[r][k], A[r][k+1]);
// B panels hold, for each k-pair, 32 columns of (B[k][j], B[k+1][j]) = 2 zmm. Same 14 x 32 tile and
// register budget as fp32, but each instruction does 2 K steps: twice the fp32 rate.
struct Bf16Avx512 {
  using Elem = u32;
  using TileFn = void (*)(const u32*, const u32*, int64_t, const Out&, int64_t, int64_t, int);
  // KC 512 elements = 256 pairs: same bytes as the fp32 policy (A panel 14 KB, B block 512 KB).
  static constexpr int64_t MR = 14, NR = 32, KG = 2, KC = 512, NC = 512;
  static_assert(KC / KG * MR * 4 <= 16 * 1024 && KC * NC * 2 <= 512 * 1024, "same budgets as F32Avx512");

  // R (<= 14) rows x kc of A -> dst[pair][R]: 16 K-pairs (32 bf16) of every row at a time, transposed as
  // 32-bit elements in registers (vec::transpose16). An odd K's last pair is (A[r][kc-1], 0) from the
  // masked load. The scalar loop this replaced was ~10% of a 2048^3 bf16 GEMM on Zen 5 (perf, 2 threads).
  // v[c] = the K-pairs c of rows 0..R-1 (lanes; the rest zero): 16 pairs (32 bf16, the first `valid` of them read,
  // the rest zero) of R <= 16 rows ld apart, transposed as 32-bit elements. Shared by pack_a and pack_t.
  PK_AVX512BF16 static void pair_columns(const u16* src, int64_t ld, int64_t R, int64_t valid, __m512i (&v)[16]) {
    const __mmask32 m = vec::mask32(valid);
    for (int64_t r = 0; r < 16; ++r) v[r] = r < R ? _mm512_maskz_loadu_epi16(m, src + r * ld) : _mm512_setzero_si512();
    vec::transpose16(v);
  }
  template <class Src> PK_AVX512BF16 static void pack_a(const Src* src, int64_t lda, int R, int64_t kc, u32* dst) {
    static_assert(std::is_same_v<Src, u16>, "bf16 policy packs bf16 only");
    const int64_t kp = cdiv(kc, 2);
    const __mmask16 rows = vec::mask16(R);
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t n = std::min<int64_t>(16, kp - p0);
      __m512i v[16];
      pair_columns(src + 2 * p0, lda, R, kc - 2 * p0, v);
      for (int64_t c = 0; c < n; ++c) _mm512_mask_storeu_epi32(dst + (p0 + c) * R, rows, v[c]);
    }
  }
  // pack_b's panels from B stored [N, K] (linear; pack_b_any): a K-pair of one column is already one u32 there,
  // so 16 pairs of 16 columns at a time are transposed as 32-bit elements (pair_columns, as pack_a); an odd kc's
  // last pair is (B[n][kc-1], 0) from the masked load. pack_bt's scalar loop, which this replaced, made linear slower
  // than GEMM (Zen 4 VM, 1 thread: 256^3 189 against 159 us, 512^3 1.34 against 1.22 ms). Zen 4 VM, 2 threads,
  // prepared linears, pack_bt -> pack_t, two alternations: 128^3 20-25 -> 12.5 us, 256^3 117-121 -> 86 (GEMM
  // 87, torch 95-96), 512^3 744-769 -> 628-634 (torch 622), 300 x 4096 x 4096 31.0-34.4 -> 27.6-29.6 ms. A B packed
  // once past the private copies goes out with non-temporal stores, as pack_b's (`stream`): C++ driver, 2 threads,
  // alternated 3x, 300 x 4096 x 4096 29.5-33.4 -> 27.5-29.4 ms, 512 x 4096 x 4096 47.2-52.9 -> 46.3-47.1 (fp32's
  // pack_t, which does the same, level: 300 x 4096 x 4096 fp32 53-70 / 57-63 ms on a noisy VM).
  template <class Src> PK_AVX512BF16 static void pack_t(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1,
                                                        int64_t nc, u32* dst, bool stream) {
    static_assert(std::is_same_v<Src, u16>, "bf16 policy packs bf16 only");
    const int64_t kcu = cdiv(kc, KG), p1 = cdiv(r1, KG);
    for (int64_t q = 0; q * NR < nc; ++q) {
      u32* dq = dst + q * kcu * NR;
      const int64_t cols = std::min(NR, nc - q * NR);
      for (int64_t p0 = r0 / KG; p0 < p1; p0 += 16) {
        const int64_t n = std::min<int64_t>(16, p1 - p0);
        for (int64_t h = 0; h < NR; h += 16) {
          __m512i v[16];
          pair_columns(src + (q * NR + h) * ldb + 2 * p0, ldb, cols - h, kc - 2 * p0, v);
          for (int64_t c = 0; c < n; ++c) put_line(dq + (p0 + c) * NR + h, v[c], stream);
        }
      }
    }
    if (stream) _mm_sfence();  // seen by the other threads after the barrier
  }
  template <class Src> PK_AVX512BF16 static void pack_b(const Src* src, int64_t ldb, int64_t kc, int64_t r0, int64_t r1,
                                                        int64_t nc, u32* dst, bool stream) {
    // out[2j] = row k col j, out[2j+1] = row k+1 col j: word-interleave two rows (vpermt2w).
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                                            38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    const int64_t kcu = cdiv(kc, KG);
    for (int64_t q0 = 0; q0 * NR < nc; q0 += kPackPanels) {
      const int64_t q1 = std::min(q0 + kPackPanels, cdiv(nc, NR));
      for (int64_t k = r0; k < r1; k += 2) {
        for (int64_t q = q0; q < q1; ++q) {
          const __mmask32 m = mask32(nc - q * NR);
          const u16* s = src + k * ldb + q * NR;
          _mm_prefetch(reinterpret_cast<const char*>(s + kPackPrefetchRows * ldb), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(s + (kPackPrefetchRows + 1) * ldb), _MM_HINT_T0);
          const __m512i x0 = _mm512_maskz_loadu_epi16(m, s);
          const __m512i x1 = k + 1 < kc ? _mm512_maskz_loadu_epi16(m, s + ldb) : _mm512_setzero_si512();
          u32* d = dst + (q * kcu + k / 2) * NR;
          put_line(d, _mm512_permutex2var_epi16(x0, lo_idx, x1), stream);
          put_line(d + 16, _mm512_permutex2var_epi16(x0, hi_idx, x1), stream);
        }
      }
    }
    if (stream) _mm_sfence();  // seen by the other threads after the barrier
  }
  template <class Src> static void reduce_row(const float* parts, int64_t stride, int nt, int64_t n, Src* c) {
    reduce_row_avx512<Src>(parts, stride, nt, n, c);
  }
  template <int R> PK_AVX512BF16 static void tile_r(const u32* a, const u32* b, int64_t kcu, const Out& o,
                                                      int64_t row, int64_t col, int nc) {
    __m512 acc[R][2];
#pragma GCC unroll 14
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kcu; ++k) {
      const __m512bh b0 = (__m512bh)_mm512_load_si512(b + k * NR);
      const __m512bh b1 = (__m512bh)_mm512_load_si512(b + k * NR + 16);
#pragma GCC unroll 14
      for (int r = 0; r < R; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[k * R + r]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
      }
    }
    store_tile<R>(acc, o, row, col, nc);
  }
};

PK_AVX512 inline void add_to(float* dst, const float* src, int64_t n) {  // n % 16 == 0, 64-byte aligned
  for (int64_t i = 0; i < n; i += 16) _mm512_store_ps(dst + i, _mm512_add_ps(_mm512_load_ps(dst + i), _mm512_load_ps(src + i)));
}

// ---- direct path (M <= direct_max_m()): no packing, B read exactly once. Work items are blocks of
// kDirectRows whole rows of B (for a full-width chunk: one contiguous run of memory) handed out
// dynamically; each thread accumulates its items into a private fp32 partial C (M x W, in L2); the
// partials are summed at the end. Inside an item, U rows of B are in flight at a time; an item is
// summed in its own buffer first and then added to the partial, so each output element sees ~K/64
// + 8 additions in a row instead of K/8 (fp32 M=4 K=4096: max error 4.1e-4 -> torch's 8e-5 level).
// The rows of a step: U rows rs apart (rs = 1: U consecutive rows). An item's rows of at most
// kSplitRowBytes are taken as U streams of kn / U consecutive rows each, step r reading rows r + u kn/U
// (rs = kn / U), so that each stream runs on through kn / U rows of contiguous memory instead of ending
// with its row: with 8 consecutive rows per step every stream stops after one row (8 KB of a bf16 row of
// 4096) and the hardware prefetchers start 8 new ones. C++ driver, Zen 5, K = N = 4096, alternated 3-6x:
// 1 thread bf16 M1 30.7-32.3 -> 35.4-36.8 GB/s, fp32 34.5-37.2 -> 37.3-40.1; 2 threads bf16 M1 47.9-50.8 ->
// 55.9-57.4, M4 39.5-41.2 -> 41.4-42.5, fp32 M4 39.4-41.1 -> 41.1-43.2, fp32 M1 level (at the read); rows of
// 44 KB (fp32 N = 11008) read 5-9% slower split on 1 thread: long rows keep consecutive steps (cpu.h).
// Runs the steps of an item of kn rows: step(k, rs, first) adds rows k + u rs (u < U), one(k, first) row k;
// first: std::true_type for the item's first step (it writes the item's buffer instead of adding to it).
template <int U, class Step, class One>
inline __attribute__((always_inline)) void direct_steps(int64_t kn, int64_t row_bytes, Step step, One one) {
  if (kn >= U && kn % U == 0 && row_bytes <= kSplitRowBytes) {
    const int64_t rs = kn / U;
    step(0, rs, std::true_type{});
    for (int64_t r = 1; r < rs; ++r) step(r, rs, std::false_type{});
    return;
  }
  int64_t k = 0;
  if (kn >= U) {
    step(0, 1, std::true_type{});
    k = U;
  } else {
    one(0, std::true_type{});
    k = 1;
  }
  for (; k + U <= kn; k += U) step(k, 1, std::false_type{});
  for (; k < kn; ++k) one(k, std::false_type{});
}
// fp32: part[m][j] (+)= sum_u A[m][k + u rs] * B[k + u rs][j]; First: '=' instead of '+='. pf (non-null): the same
// rows and columns of the next item, prefetched into L2 as these are read (direct_f32's PF).
template <int M, int U, bool First> PK_AVX512 inline void direct_f32_step(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                               int64_t rs, int64_t nv, __mmask16 tail, float* part,
                                                               const float* pf = nullptr) {
  __m512 av[M][U];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) av[m][u] = _mm512_set1_ps(a[m * lda + u * rs]);
  const int64_t ldr = rs * ldb;  // between the step's rows
  // Plain loads for the full vectors, a masked one only for the last: masked loads of every vector read
  // ~15% slower from DRAM on Zen 5 (a GEMV-order read loop: 32-33 -> 26-29 GB/s on one core).
  const auto columns = [&](int64_t v, auto masked) PK_AVX512 {
    __m512 bv[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
      bv[u] = masked ? _mm512_maskz_loadu_ps(tail, b + u * ldr + v * 16) : _mm512_loadu_ps(b + u * ldr + v * 16);
    if (pf != nullptr) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) _mm_prefetch(reinterpret_cast<const char*>(pf + u * ldr + v * 16), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      float* c = part + m * cdiv(nv, 2) * 32 + v * 16;  // rows of the partial are 32-column aligned
      __m512 s0 = First ? _mm512_setzero_ps() : _mm512_load_ps(c), s1 = _mm512_setzero_ps();  // 2 chains
#pragma GCC unroll 8
      for (int u = 0; u < U; u += 2) {
        s0 = _mm512_fmadd_ps(av[m][u], bv[u], s0);
        if (u + 1 < U) s1 = _mm512_fmadd_ps(av[m][u + 1], bv[u + 1], s1);
      }
      _mm512_store_ps(c, _mm512_add_ps(s0, s1));
    }
  };
  for (int64_t v = 0; v + 1 < nv; ++v) columns(v, std::false_type{});
  columns(nv - 1, std::true_type{});
}
// Adds rows [0, kn) of B (b = &B[k][j0], a = &A[0][k]) times A to part (M x cdiv(w,32)*32), summed
// in tmp (same shape) first.
// PF: pf is the next item's rows at the same place, prefetched into L2 on the way (direct_f32_step); else unused.
template <int M, int U = 8, bool PF = false> PK_AVX512 void direct_f32(const float* a, int64_t lda, const float* b,
                                                                       int64_t ldb, int64_t kn, int64_t w, float* part,
                                                                       float* tmp, const float* pf) {
  // U = 8 rows of B in flight: each partial load/store (L2) is amortized over 8 FMAs; at M = 4 that beat
  // U = 4 by ~10% although the 32 broadcasts no longer all fit in registers. M = 1 may take U = 4 (cpu.h
  // gemv_streams).
  const int64_t nv = cdiv(w, 16);
  const __mmask16 tail = mask16(w - (nv - 1) * 16);
  direct_steps<U>(
      kn, w * 4,
      [&](int64_t k, int64_t rs, auto first) PK_AVX512 {
        direct_f32_step<M, U, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, rs, nv, tail, tmp,
                                                      PF ? pf + k * ldb : nullptr);
      },
      [&](int64_t k, auto first) PK_AVX512 {
        direct_f32_step<M, 1, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, 1, nv, tail, tmp,
                                                      PF ? pf + k * ldb : nullptr);
      });
  add_to(part, tmp, M * cdiv(w, 32) * 32);
}

// The even / odd fp32 pair of a bf16 partial at c (32 floats): loaded (zero when First), updated, stored.
template <bool First, class F> PK_AVX512 inline __attribute__((always_inline)) void update_pair(float* c, F update) {
  __m512 se = First ? _mm512_setzero_ps() : _mm512_load_ps(c);
  __m512 so = First ? _mm512_setzero_ps() : _mm512_load_ps(c + 16);
  update(se, so);
  _mm512_store_ps(c, se);
  _mm512_store_ps(c + 16, so);
}

// bf16: 32 columns come in as one 64-byte load and are widened in place: the even columns by a
// 16-bit shift, the odd ones by masking off the low half. The partial keeps, per 32 columns,
// [16 even | 16 odd]; the final narrowing puts them back in order with one OR.
template <int M, int U, bool First> PK_AVX512 inline void direct_bf16_step(const u16* a, int64_t lda, const u16* b, int64_t ldb,
                                                                int64_t rs, int64_t ng, __mmask32 tail, float* part,
                                                                const u16* pf = nullptr) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 av[M][U];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) av[m][u] = _mm512_set1_ps(bf16_to_float(a[m * lda + u * rs]));
  const int64_t ldr = rs * ldb;
  const auto columns = [&](int64_t g, auto masked) PK_AVX512 {  // plain loads but the last (see f32)
    __m512 be[U], bo[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512i raw = masked ? _mm512_maskz_loadu_epi16(tail, b + u * ldr + g * 32)
                                 : _mm512_loadu_si512(b + u * ldr + g * 32);
      be[u] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      bo[u] = _mm512_castsi512_ps(_mm512_and_si512(raw, hi_mask));
      if (pf != nullptr) _mm_prefetch(reinterpret_cast<const char*>(pf + u * ldr + g * 32), _MM_HINT_T1);  // as f32
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
      update_pair<First>(part + (m * ng + g) * 32, [&](__m512& se, __m512& so) PK_AVX512 {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          se = _mm512_fmadd_ps(av[m][u], be[u], se);
          so = _mm512_fmadd_ps(av[m][u], bo[u], so);
        }
      });
  };
  for (int64_t g = 0; g + 1 < ng; ++g) columns(g, std::false_type{});
  columns(ng - 1, std::true_type{});
}
// bf16 where vdpbf16ps pays (Zen 4 / Zen 5): rows k and k+1 of B word-interleaved by vpermt2w into
// (B[k][j], B[k+1][j]) pairs, the even columns in one vector and the odd ones in the other (the layout of
// direct_bf16_step's partial), and one vdpbf16ps per pair of rows and 16 columns against (A[m][k], A[m][k+1]):
// per two rows and 32 columns 2 permutes and 2M vdpbf16ps instead of 4 widening ops and 4M FMAs.
template <int M, int U, bool First> PK_AVX512BF16 inline void direct_bf16dp_step(const u16* a, int64_t lda, const u16* b,
                                                                      int64_t ldb, int64_t rs, int64_t ng, __mmask32 tail,
                                                                      float* part, const u16* pf = nullptr) {
  static_assert(U % 2 == 0, "rows of B go in pairs");
  // even columns: (x0[2i], x1[2i]) for i = 0..15; odd: (x0[2i+1], x1[2i+1]) (x1's words are 32..63)
  const __m512i even_idx = _mm512_set_epi16(62, 30, 60, 28, 58, 26, 56, 24, 54, 22, 52, 20, 50, 18, 48, 16, 46, 14,
                                            44, 12, 42, 10, 40, 8, 38, 6, 36, 4, 34, 2, 32, 0);
  const __m512i odd_idx = _mm512_add_epi16(even_idx, _mm512_set1_epi16(1));
  __m512i av[M][U / 2];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < U / 2; ++u)
      av[m][u] = _mm512_set1_epi32(static_cast<int>(a[m * lda + 2 * u * rs] | (static_cast<u32>(a[m * lda + (2 * u + 1) * rs]) << 16)));
  const int64_t ldr = rs * ldb;
  const auto columns = [&](int64_t g, auto masked) PK_AVX512BF16 {
    __m512i pe[U / 2], po[U / 2];
#pragma GCC unroll 4
    for (int u = 0; u < U / 2; ++u) {
      const u16* r0 = b + 2 * u * ldr + g * 32;
      const __m512i x0 = masked ? _mm512_maskz_loadu_epi16(tail, r0) : _mm512_loadu_si512(r0);
      const __m512i x1 = masked ? _mm512_maskz_loadu_epi16(tail, r0 + ldr) : _mm512_loadu_si512(r0 + ldr);
      pe[u] = _mm512_permutex2var_epi16(x0, even_idx, x1);
      po[u] = _mm512_permutex2var_epi16(x0, odd_idx, x1);
      if (pf != nullptr) {  // as f32
        _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * u * ldr + g * 32), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pf + (2 * u + 1) * ldr + g * 32), _MM_HINT_T1);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
      update_pair<First>(part + (m * ng + g) * 32, [&](__m512& se, __m512& so) PK_AVX512BF16 {
#pragma GCC unroll 4
        for (int u = 0; u < U / 2; ++u) {
          se = _mm512_dpbf16_ps(se, (__m512bh)av[m][u], (__m512bh)pe[u]);
          so = _mm512_dpbf16_ps(so, (__m512bh)av[m][u], (__m512bh)po[u]);
        }
      });
  };
  for (int64_t g = 0; g + 1 < ng; ++g) columns(g, std::false_type{});
  columns(ng - 1, std::true_type{});
}

// PF: as direct_f32.
template <int M, int U = 8, bool PF = false> PK_AVX512 void direct_bf16(const u16* a, int64_t lda, const u16* b,
                                                                        int64_t ldb, int64_t kn, int64_t w, float* part,
                                                                        float* tmp, const u16* pf) {
  const int64_t ng = cdiv(w, 32);
  const __mmask32 tail = mask32(w - (ng - 1) * 32);
  direct_steps<U>(
      kn, w * 2,
      [&](int64_t k, int64_t rs, auto first) PK_AVX512 {
        direct_bf16_step<M, U, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, rs, ng, tail, tmp,
                                                       PF ? pf + k * ldb : nullptr);
      },
      [&](int64_t k, auto first) PK_AVX512 {
        direct_bf16_step<M, 1, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, 1, ng, tail, tmp,
                                                       PF ? pf + k * ldb : nullptr);
      });
  add_to(part, tmp, M * ng * 32);
}

// direct_bf16 with the vdpbf16ps steps (whole groups of U rows; the rest as there).
template <int M, int U = 8, bool PF = false> PK_AVX512BF16 void direct_bf16dp(const u16* a, int64_t lda, const u16* b,
                                                                            int64_t ldb, int64_t kn, int64_t w,
                                                                            float* part, float* tmp, const u16* pf) {
  if (kn < U) return direct_bf16<M, 8, PF>(a, lda, b, ldb, kn, w, part, tmp, pf);
  const int64_t ng = cdiv(w, 32);
  const __mmask32 tail = mask32(w - (ng - 1) * 32);
  direct_steps<U>(
      kn, w * 2,
      [&](int64_t k, int64_t rs, auto first) PK_AVX512BF16 {
        direct_bf16dp_step<M, U, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, rs, ng, tail, tmp,
                                                         PF ? pf + k * ldb : nullptr);
      },
      [&](int64_t k, auto first) PK_AVX512 {
        direct_bf16_step<M, 1, decltype(first)::value>(a + k, lda, b + k * ldb, ldb, 1, ng, tail, tmp,
                                                       PF ? pf + k * ldb : nullptr);
      });
  add_to(part, tmp, M * ng * 32);
}

// Every direct kernel: (A, lda, B, ldb, rows, columns, partial, item buffer, the next item's B for PF kernels).
template <class T> using DirectFn = void (*)(const T*, int64_t, const T*, int64_t, int64_t, int64_t, float*, float*,
                                             const T*);

// M = 1 with 4 rows of B per step (cpu.h gemv_streams).
template <class T, bool DP> constexpr DirectFn<T> direct_one4() {
  if constexpr (std::is_same_v<T, float>) return &direct_f32<1, 4>;
  else if constexpr (DP) return &direct_bf16dp<1, 4>;
  else return &direct_bf16<1, 4>;
}

// The kernels for M = 1..sizeof...(I); PF: those that prefetch the next item (the last pass of a two-pass call).
template <class T, bool DP, bool PF, size_t... I> constexpr auto direct_table(std::index_sequence<I...>) {
  if constexpr (std::is_same_v<T, float>) {
    return std::array<DirectFn<T>, sizeof...(I)>{&direct_f32<static_cast<int>(I) + 1, 8, PF>...};
  } else if constexpr (DP) {
    return std::array<DirectFn<T>, sizeof...(I)>{&direct_bf16dp<static_cast<int>(I) + 1, 8, PF>...};
  } else {
    return std::array<DirectFn<T>, sizeof...(I)>{&direct_bf16<static_cast<int>(I) + 1, 8, PF>...};
  }
}

// Sums the nt partials (each `stride` floats apart) for 32 columns [32g, 32g+32) of row m and stores.
PK_AVX512 void direct_reduce(const float* part, int64_t stride, int nt, int64_t wp, int64_t m, int64_t g,
                             int64_t w, float* c) {
  const float* s = part + m * wp + g * 32;
  __m512 lo = _mm512_load_ps(s), hi = _mm512_load_ps(s + 16);
  for (int t = 1; t < nt; ++t) {
    lo = _mm512_add_ps(lo, _mm512_load_ps(s + t * stride));
    hi = _mm512_add_ps(hi, _mm512_load_ps(s + t * stride + 16));
  }
  _mm512_mask_storeu_ps(c + g * 32, mask16(w - g * 32), lo);
  _mm512_mask_storeu_ps(c + g * 32 + 16, mask16(w - g * 32 - 16), hi);
}
PK_AVX512 void direct_reduce(const float* part, int64_t stride, int nt, int64_t wp, int64_t m, int64_t g,
                             int64_t w, u16* c) {
  const float* s = part + m * wp + g * 32;
  __m512 e = _mm512_load_ps(s), o = _mm512_load_ps(s + 16);
  for (int t = 1; t < nt; ++t) {
    e = _mm512_add_ps(e, _mm512_load_ps(s + t * stride));
    o = _mm512_add_ps(o, _mm512_load_ps(s + t * stride + 16));
  }
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i v = _mm512_or_si512(_mm512_srli_epi32(bf16_rne_hi(e), 16), _mm512_and_si512(bf16_rne_hi(o), hi_mask));
  _mm512_mask_storeu_epi16(c + g * 32, mask32(w - g * 32), v);
}

template <class T> void gemm_direct_avx512(const GemmParams& p) {
  static constexpr auto widen = direct_table<T, false, false>(std::make_index_sequence<kDirectMaxMWide>());
  static constexpr auto dp = direct_table<T, true, false>(std::make_index_sequence<kDirectMaxMWide>());
  static constexpr auto widen_pf = direct_table<T, false, true>(std::make_index_sequence<kDirectMaxMWide>());
  static constexpr auto dp_pf = direct_table<T, true, true>(std::make_index_sequence<kDirectMaxMWide>());
  // bf16 on vdpbf16ps where it pays (Zen 4 / Zen 5): C++ driver on Zen 5, K = N = 4096, 1 thread, M = 1 / 4 / 8
  // 32.5-33.5 -> 33.5-34.2 / 17.0-19.0 -> 24.7-25.6 / 15.4-15.5 -> 18.8-19.2 GB/s of B (2 threads M4 +17%)
  const bool use_dp = std::is_same_v<T, u16> && use_bf16_dot();
  const auto& direct = use_dp ? dp : widen;
  const auto& direct_pf = use_dp ? dp_pf : widen_pf;
  // M = 1: 4 or 8 rows of B per step (cpu.h gemv_streams: fewer streams per core read faster on Zen 5)
  const auto one = gemv_streams() == 4 ? (use_dp ? direct_one4<T, true>() : direct_one4<T, false>()) : direct[0];
  const int64_t M = p.M, N = p.N, K = p.K;
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  T* C = static_cast<T*>(p.c);
  // rows per pass over an item of B, the passes as even as they can be (M = 10: 5 + 5, not 8 + 2)
  const int64_t pass = cdiv(M, cdiv(M, direct_max_m()));
  // Columns per chunk: as many as the partial holds; with two passes, a power of two of even chunks (M = 9 / 10 / 12, N
  // = 4096: 4 x 1024 rather than 3 x 1792 / 3 x 1632 / 3 x 1344 + 64; the last of those read 256-byte runs of every row)
  const int64_t wmax = std::max<int64_t>(32, kDirectPartialFloats / M / 32 * 32);
  int64_t nchunks = 1;
  while (M > pass && nchunks < cdiv(N, wmax)) nchunks *= 2;
  const int64_t W = std::min(cdiv(N, 32) * 32, M > pass ? cdiv(cdiv(N, nchunks), 32) * 32 : wmax);
  const int64_t items = cdiv(K, kDirectRows);
  ContentionGuard guard(g_solo_direct, static_cast<int>(std::min<int64_t>(few_rows_threads(p, items), items)));
  const int nt = guard.threads();
  const int64_t stride = M * W;  // floats per thread partial
  Carver cv;
  cv.take<float>(2 * nt * stride);
  const CallBuffer scratch(arena(), cv.off);
  float* parts = scratch.as<float>();  // nt partials, then nt item buffers
  run_team(nt, [&](int t, int nt, Team& team) {
    float* part = parts + t * stride;
    float* tmp = parts + (nt + t) * stride;
    for (int64_t j0 = 0; j0 < N; j0 += W) {
      const int64_t w = std::min(W, N - j0), wp = cdiv(w, 32) * 32, groups = M * (wp / 32);
      std::memset(part, 0, sizeof(float) * M * wp);
      for (int64_t it = team.grab(); it < items;) {
        const int64_t k = it * kDirectRows, kn = std::min(kDirectRows, K - k);
        // Two passes: the next item is claimed now, and its rows are prefetched into L2 while the last pass computes
        // from L2 (otherwise nothing is read from memory then).
        const int64_t next = M > pass ? team.grab() : items;
        const bool pf = next < items && next * kDirectRows + kn <= K;
        for (int64_t m0 = 0; m0 < M; m0 += pass) {  // later passes find the item's rows of B in L2
          const int64_t mm = std::min(pass, M - m0);
          if (pf && m0 + pass >= M) {
            direct_pf[mm - 1](A + m0 * K + k, K, B + k * N + j0, N, kn, w, part + m0 * wp, tmp + m0 * wp,
                              B + next * kDirectRows * N + j0);
            continue;
          }
          (mm == 1 ? one : direct[mm - 1])(A + m0 * K + k, K, B + k * N + j0, N, kn, w, part + m0 * wp,
                                           tmp + m0 * wp, nullptr);
        }
        it = M > pass ? next : team.grab();
      }
      guard.barrier(team, t);
      const bool last = j0 + W >= N;  // as in gemm_slabs: the last sum is thread 0's alone
      const int64_t g0 = last ? 0 : groups * t / nt, g1 = last ? (t == 0 ? groups : 0) : groups * (t + 1) / nt;
      for (int64_t mg = g0; mg < g1; ++mg) {
        const int64_t m = mg / (wp / 32);
        direct_reduce(parts, stride, nt, wp, m, mg % (wp / 32), w, C + m * N + j0);
      }
      if (!last) guard.barrier(team, t);  // the partials are reused by the next chunk
    }
    guard.body_done(t);
  });
}
// bf16 linear from this many rows runs on AMX tiles where the tier has them: vdpbf16ps issues at half
// the fp32 FMA rate on Sapphire Rapids, so the dot path turns compute-bound. N = K = 4096, 2 threads,
// Sapphire Rapids VM: M = 2 / 4 / 5 / 6 / 8 took 0.60 / 0.85 / 1.14 / 1.31 / 1.69 ms on the dot path and
// 1.12 / 1.08 / 1.09 / 1.12 / 1.16 ms on AMX (torch 1.03-1.09).
constexpr int64_t kAmxLinearMinM = 5;
// bf16 GEMMs below this many multiply-adds (M N K) stay off the AMX tiles. A tile call costs ~0.4 us
// more (0.3-0.9) whenever anything ran on the core since the last one (a Python loop of 0.2 us, an
// empty_like, a torch add): prepared 16^3 calls back to back took 0.35 us on AMX and 0.40 on vdpbf16ps,
// but with an empty_like between them 1.43 vs 1.09 (24^3 1.52 vs 1.36, 32^3 1.54 vs 1.69, 48^3 2.2 vs
// 3.4). Not the tile release (kept configured: the same). Sapphire Rapids VM, 2026-12-05.
constexpr double kAmxMinMnk = 32.0 * 32 * 32;

// 16 values at p (m: the live ones, the rest zero; an all-ones m compiles to a plain load).
template <class T> PK_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return m == __mmask16(0xFFFF) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  } else {  // bf16 -> fp32: the 16 bits are the high half of the float
    const __m256i h = m == __mmask16(0xFFFF) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                             : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}


// Rows [n0, n1) of B (linear's weight rows, contiguous in K) dotted with the M rows of A, R rows of B at a
// time. A block of a multiple of R rows is taken as R streams of consecutive rows (the step at n takes rows
// n + j (n1 - n0) / R), so each stream runs on through contiguous memory instead of ending with its row, as
// the direct path does (kSplitRowBytes). C++ driver (TRANSB), Zen 5, K = N = 4096, alternated 3x: 1 thread
// M1 bf16 38.2-40.3 -> 44.6-47.1 GB/s, fp32 39.3-40.4 -> 43.8-44.2, M4 +6-8%; 2 threads M1 bf16 58.2-73.8 ->
// 61.5-87.2, M4 +1-12%; level or better at K = 11008 (rows of 22 / 44 KB) and N = 11008.
// With R = 4 (M = 2-4) the sums of a step go through one transposed reduction (vec::hsum16) instead of one
// horizontal sum each: at short K they are most of the work. Sapphire Rapids VM, fp32, 2 threads, prepared calls
// (us): 4 x 1024 x 64 13.3-13.9 -> 10.6-10.7, 2 x 1024 x 64 7.2-7.3 -> 5.8-5.9, 4 x 256 x 256 level; with R = 2 (M = 8,
// 16 sums) it was slower (8 x 1024 x 64 18-21 -> 22.5-23), so not there.
template <class T, int M, int R>
PK_AVX512 void dot_rows(const T* A, const T* B, int64_t K, int64_t N, int64_t n0, int64_t n1, T* C) {
  const bool split = (n1 - n0) % R == 0;  // R streams of consecutive rows (see dot_rows)
  const int64_t rs = split ? (n1 - n0) / R : 1, n_end = split ? n0 + rs : n1, n_step = split ? 1 : R;
  for (int64_t n = n0; n < n_end; n += n_step) {
    const int r = split ? R : static_cast<int>(std::min<int64_t>(R, n1 - n));
    const T* b[R];
    for (int j = 0; j < R; ++j) b[j] = B + (n + std::min(j, r - 1) * rs) * K;  // a short block repeats its last row
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < R; ++j) acc[m][j] = _mm512_setzero_ps();
    // plain loads for the full blocks of K, a masked one only for the last (as the direct path: masked
    // loads of every vector read ~15% slower from DRAM on Zen 5)
    const auto step = [&](int64_t k, __mmask16 mk) PK_AVX512 {
      __m512 bv[R];
      for (int j = 0; j < R; ++j) bv[j] = load16(b[j] + k, mk);
      for (int m = 0; m < M; ++m) {
        const __m512 av = load16(A + m * K + k, mk);
        for (int j = 0; j < R; ++j) acc[m][j] = _mm512_fmadd_ps(av, bv[j], acc[m][j]);
      }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) step(k, __mmask16(0xFFFF));
    if (k < K) step(k, mask16(K - k));
    if constexpr (R == 4 && M >= 2) {  // the M x 4 sums in one transposed reduction (see above)
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = i < M * R ? acc[i / R][i % R] : _mm512_setzero_ps();
      alignas(64) float sums[16];
      _mm512_store_ps(sums, vec::hsum16(v));
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < r; ++j) store_out(C + m * N + n + j * rs, sums[m * R + j]);
      continue;
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) store_out(C + m * N + n + j * rs, _mm512_reduce_add_ps(acc[m][j]));
  }
}

// bf16 with AVX512_BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes, no widening; the lane sums
// of a dot product do not care which K lands in which lane.
template <int M, int R>
PK_AVX512BF16 void dot_rows_bf16dp(const u16* A, const u16* B, int64_t K, int64_t N, int64_t n0, int64_t n1, u16* C) {
  const bool split = (n1 - n0) % R == 0;  // R streams of consecutive rows (see dot_rows)
  const int64_t rs = split ? (n1 - n0) / R : 1, n_end = split ? n0 + rs : n1, n_step = split ? 1 : R;
  for (int64_t n = n0; n < n_end; n += n_step) {
    const int r = split ? R : static_cast<int>(std::min<int64_t>(R, n1 - n));
    const u16* b[R];
    for (int j = 0; j < R; ++j) b[j] = B + (n + std::min(j, r - 1) * rs) * K;
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < R; ++j) acc[m][j] = _mm512_setzero_ps();
    const auto step = [&](int64_t k, __mmask32 mk) PK_AVX512BF16 {  // plain loads but the last (see dot_rows)
      const bool full = mk == __mmask32(0xFFFFFFFFu);
      __m512i bv[R];
      for (int j = 0; j < R; ++j) bv[j] = full ? _mm512_loadu_si512(b[j] + k) : _mm512_maskz_loadu_epi16(mk, b[j] + k);
      for (int m = 0; m < M; ++m) {
        const __m512i av = full ? _mm512_loadu_si512(A + m * K + k) : _mm512_maskz_loadu_epi16(mk, A + m * K + k);
        for (int j = 0; j < R; ++j)
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], reinterpret_cast<__m512bh>(av), reinterpret_cast<__m512bh>(bv[j]));
      }
    };
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) step(k, __mmask32(0xFFFFFFFFu));
    if (k < K) step(k, mask32(K - k));
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) C[m * N + n + j * rs] = float_to_bf16(_mm512_reduce_add_ps(acc[m][j]));
  }
}

template <size_t... I> constexpr auto dot_table_bf16dp(std::index_sequence<I...>) {
  using Fn = void (*)(const u16*, const u16*, int64_t, int64_t, int64_t, int64_t, u16*);
  return std::array<Fn, sizeof...(I)>{&dot_rows_bf16dp<static_cast<int>(I) + 1, (I + 1 <= 4 ? 4 : 2)>...};
}

template <class T, size_t... I> constexpr auto dot_table(std::index_sequence<I...>) {
  using Fn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, int64_t, T*);
  return std::array<Fn, sizeof...(I)>{&dot_rows<T, static_cast<int>(I) + 1, (I + 1 <= 4 ? 4 : 2)>...};
}

// Up to kDotTwoPassMaxM rows: one pass of rows, or two over each block of B rows (run_dot). fp32 linear,
// N = K = 4096, 2 threads, Sapphire Rapids VM: M = 9 / 12 / 16 took 6.2 / 6.1 / 6.1 ms through
// gemm_nt_swapped (half of its 32-column tiles padding; torch 3.8 / 5.0 / 4.9).
constexpr int64_t kDotTwoPassMaxM = 2 * kDotMaxM;
template <class T> void gemm_dot_avx512(const GemmParams& p) {
  static constexpr auto dot = dot_table<T>(std::make_index_sequence<kDotMaxM>());
  const bool dp = std::is_same_v<T, u16> && enabled().avx512_bf16;
  run_dot<T>(p, [dp](int64_t m) {
    if constexpr (std::is_same_v<T, u16>) {
      static constexpr auto dot_dp = dot_table_bf16dp(std::make_index_sequence<kDotMaxM>());
      if (dp) return dot_dp[m - 1];
    }
    return dot[m - 1];
  });
}

// The packed avx512 paths for a problem (the policy as gemm_typed picks it).
template <class Src> void gemm_packed_avx512(const GemmParams& p) {
  if constexpr (std::is_same_v<Src, u16>)
    if (use_bf16_dot()) return gemm_packed<Bf16Avx512, u16>(p);
  gemm_packed<F32Avx512, Src>(p);
}

// linear (B stored [N, K]) above the dot path's rows: C^T = B . A^T, with the weight rows as the packed
// A panels (contiguous in K: pack_a streams them) and A^T as the small packed B, into a scratch C^T
// [N][M], then transposed into C. Packing B [N, K] for the plain order gathers 32 k-values from rows
// 16 KB apart (N = K = 4096 fp32): M = 16 / 32 / 64 / 128 took 7.8 / 9.0 / 10.1 / 20.6 ms that way.
constexpr int64_t kSwapMaxM = 256;
template <class Src> void gemm_nt_swapped(const GemmParams& p) {
  const int64_t M = p.M, N = p.N;
  thread_local Keep keep;  // not arena(): the packed GEMM below uses that
  const CallBuffer scratch(keep, size_t(M * N) * sizeof(Src));
  Src* ct = scratch.as<Src>();
  GemmParams q = p;
  q.a = p.b;
  q.b = p.a;
  q.c = ct;
  q.M = N;
  q.N = M;
  q.transb = true;
  gemm_packed_avx512<Src>(q);
  // C^T [N][M] -> C [M][N], blocks of 64 rows of C^T (an M x 64 transpose stays in L1), shared by the
  // threads of the GEMM
  constexpr int64_t kBlock = 64;
  Src* C = static_cast<Src*>(p.c);
  const int64_t blocks = cdiv(N, kBlock);
  run_team(static_cast<int>(std::min<int64_t>(pick_threads(p), blocks)), [&](int, int, Team& team) {
    for (int64_t bi; (bi = team.grab()) < blocks;) {
      const int64_t n0 = bi * kBlock, n1 = std::min(N, n0 + kBlock);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) C[m * N + n] = ct[n * M + m];
    }
    team.barrier();
  });
}
#endif  // PK_X86

template <class Src> void gemm_typed(const GemmParams& p) {
  [[maybe_unused]] const Features f = enabled();  // the active ISA tier (cpu.h)
#if defined(PK_X86)
  if (!f.avx512f && f.avx2_fma) return gemm_avx2(p);
  if (f.avx512f) {
    if constexpr (std::is_same_v<Src, float>)  // a few rows on a small B: in place rather than direct (kInPlaceMinM)
      if (!p.transb && p.M >= kInPlaceMinM && p.M <= direct_two_pass_max_m() && in_place_small_b(p))
        return gemm_in_place<F32Avx512>(p);
    if (p.M <= direct_max_m() && !p.transb) return gemm_direct_avx512<Src>(p);  // direct reads B as [K, N]
    if constexpr (std::is_same_v<Src, u16>) {  // bf16 past the direct path (linear: from kAmxLinearMinM)
      const bool tiles = double(p.M) * double(p.N) * double(p.K) >= kAmxMinMnk;
      if (f.amx_bf16 && tiles && (!p.transb || p.M >= kAmxLinearMinM)) return gemm_amx(p);
    }
    if constexpr (std::is_same_v<Src, float>)  // linear, short K: in place rather than dot (kInPlaceLinearKPerRow)
      if (p.transb && p.M > kDotMaxM / 2 && p.K <= kInPlaceLinearKPerRow * p.M && in_place_gemm<F32Avx512>(p))
        return gemm_in_place<F32Avx512>(p);
    if (p.M <= kDotTwoPassMaxM && p.transb) return gemm_dot_avx512<Src>(p);  // rows of B are contiguous in K
    if constexpr (std::is_same_v<Src, float>)  // small: read in place (past the direct path's rows)
      if ((p.transb || p.M > direct_two_pass_max_m()) && in_place_gemm<F32Avx512>(p)) return gemm_in_place<F32Avx512>(p);
    if (p.transb && p.M <= kSwapMaxM && p.N >= 4 * p.M) return gemm_nt_swapped<Src>(p);
    // bf16 where vdpbf16ps pays (and no AMX took it): the packed vdpbf16ps path beats the widening
    // two-pass direct one. Zen 5, K = N = 4096, 2 threads (C++ driver): M = 12 / 16 1.60 / 1.68 ms packed
    // against 1.97 / 2.38 direct (torch 2.2-2.4 at M = 16); at M <= 8 the two are level or direct wins.
    const bool dp_packed = std::is_same_v<Src, u16> && use_bf16_dot();
    if (p.M <= direct_two_pass_max_m() && !p.transb && !dp_packed) return gemm_direct_avx512<Src>(p);
    return gemm_packed_avx512<Src>(p);
  }
#endif
#if defined(__aarch64__)
  if (f.neon && p.M <= kDirectMaxM && !p.transb) return gemm_direct_neon<Src>(p);
  if (f.neon && p.transb && p.M <= kDotMaxM) return gemm_dot_neon<Src>(p);  // rows of B are contiguous in K
#endif
  if (p.M <= kDirectMaxM && !p.transb) return gemm_direct_portable<Src>(p);
  if (p.transb && p.M <= kDotPortableMaxM) return gemm_dot_portable<Src>(p);  // rows of B are contiguous in K
#if defined(__aarch64__)
  if (f.neon) return gemm_packed<F32Neon, Src>(p);
#endif
  if constexpr (std::is_same_v<Src, float>)
    if (p.M > kDirectMaxM && in_place_gemm<Portable>(p)) return gemm_in_place<Portable>(p);
  return gemm_packed<Portable, Src>(p);
}

}  // namespace

void gemm(const GemmParams& p) {
  if (p.dtype == DType::f32) return gemm_typed<float>(p);
  if (p.dtype == DType::bf16) return gemm_typed<u16>(p);
  throw std::invalid_argument(std::string("native cpu gemm does not support dtype ") + dtype_name(p.dtype));
}

}  // namespace pk::cpu
