// gemm: C[M,N] = A[M,K] . B[K,N], row-major, fp16/bf16 in and out, fp32 accumulation.
//
// Three kernels, chosen per call (gemm() at the bottom):
//  1. gemm_wgmma_kernel (sm_90a only): TMA (cp.async.bulk.tensor) loads 128x64 A and 64x256 B tiles
//     into a 4-stage ring of 128-byte-swizzled shared memory, completing on mbarriers; one producer
//     warpgroup, two consumer warpgroups each issuing wgmma m64n256k16 on 64 rows of the 128x256 tile.
//  2. gemm_mma_kernel (sm_80+): mma.sync m16n8k16 fed by ldmatrix from XOR-swizzled shared memory,
//     cp.async multi-stage pipeline; three tile shapes (128x128, 64x128, 16x128) and split-K, so that
//     decode-sized M (1..64) still launches ~2 CTAs per SM and streams B at memory speed.
//     With kVec = false the same kernel loads element by element (any K, N, alignment).
//  3. splitk_reduce_kernel: sums the fp32 split-K partials in a fixed order (deterministic) into C.
#include <cuda.h>  // CUtensorMap and its enums only: the driver function is fetched at run time
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace pk::cuda {
namespace {

// ================================================================================================
// mma.sync path (sm_80+)
// ================================================================================================

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct MmaCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WTM = BM / WARPS_M;  // warp tile
  static constexpr int WTN = BN / WARPS_N;
  static constexpr int MT = WTM / 16;  // m16 tiles per warp
  static constexpr int NT = WTN / 8;   // n8 tiles per warp
  static constexpr int A_CHUNKS = BK / 8;  // 16-byte chunks per smem row of A (BK elements)
  static constexpr int B_CHUNKS = BN / 8;  // ... of B (BN elements)
  static constexpr int A_STAGE = BM * BK;  // elements
  static constexpr int B_STAGE = BK * BN;
  static constexpr int SMEM = STAGES * (A_STAGE + B_STAGE) * 2;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile: whole m16 tiles and pairs of n8 tiles (ldmatrix.x4.trans)");
  static_assert(BK % 16 == 0, "k16 steps");
  static_assert((BM * A_CHUNKS) % kThreads == 0 && (BK * B_CHUNKS) % kThreads == 0, "whole chunks per thread");
  static_assert(STAGES >= 2, "pipeline");
  static_assert(SMEM <= 227 * 1024, "fits an SM (227 KB opt-in on H100, 163 KB on A100 checked at run time)");
};

// 128x128x32, 8 warps of 64x32, 4 stages: 64 KB smem, 64 fp32 accumulators per thread; 2 CTAs/SM fit
// in registers (<= 128 regs) and smem (128 KB), so one CTA's epilogue/prologue hides behind the other.
// Arithmetic intensity per stage: 2*128*128*32 FLOP / 16 KB = 64 FLOP/B of global (L2) traffic.
using CfgLarge = MmaCfg<128, 128, 32, 2, 4, 4, 2>;
// 64x128x32, 4 warps of 32x64, 4 stages: 48 KB; for 17..64 rows (prefill tails, batched decode).
using CfgMid = MmaCfg<64, 128, 32, 2, 2, 4, 3>;
// 16x128x64, 4 warps of 16x32, 4 stages: 72 KB, 64 KB of B in flight per CTA; for M <= 16, where the
// whole problem is reading B once (4096x4096 bf16: 32 MB, ~11 us at 3 TB/s) and mma work is ~1/8 waste.
using CfgSmall = MmaCfg<16, 128, 64, 1, 4, 4, 2>;

// Tile order: groups of kGroupM row-tiles walk down a column of tiles together, so that the B panel
// of a column is read from L2 by kGroupM CTAs in a row (Triton's "grouped ordering").
constexpr int kGroupM = 8;

__device__ __forceinline__ void tile_of(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  const int per_group = kGroupM * tiles_n;
  const int group = pid / per_group;
  const int first_m = group * kGroupM;
  const int gsize = min(tiles_m - first_m, kGroupM);
  const int in_group = pid - group * per_group;
  tm = first_m + in_group % gsize;
  tn = in_group / gsize;
}

// kVec: 16-byte cp.async loads; needs K % 8 == 0, N % 8 == 0 and 16-byte aligned A and B so that every
// 16-byte chunk of a row is either wholly inside or wholly outside the matrix. Otherwise element loads.
// partial != nullptr: write fp32 partial sums of this K-split to partial[z][M][N] instead of C.
template <typename T, class C, bool kVec>
__global__ void __launch_bounds__(C::kThreads, C::MIN_BLOCKS)
    gemm_mma_kernel(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ Cout,
                    float* __restrict__ partial, int M, int N, int K, int k_per_split) {
  extern __shared__ __align__(128) uint8_t smem_mma[];
  T* sA = reinterpret_cast<T*>(smem_mma);
  T* sB = sA + C::STAGES * C::A_STAGE;

  const int tiles_m = (M + C::BM - 1) / C::BM;
  const int tiles_n = (N + C::BN - 1) / C::BN;
  int tm, tn;
  tile_of(blockIdx.x, tiles_m, tiles_n, tm, tn);
  const int m0 = tm * C::BM, n0 = tn * C::BN;
  const int k_begin = blockIdx.z * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const int ktiles = (k_end - k_begin + C::BK - 1) / C::BK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;

  auto load_stage = [&](int kt, int stage) {
    const int k0 = k_begin + kt * C::BK;
    T* a_dst = sA + stage * C::A_STAGE;
    T* b_dst = sB + stage * C::B_STAGE;
#pragma unroll
    for (int i = 0; i < C::BM * C::A_CHUNKS / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      const int r = idx / C::A_CHUNKS, c = idx % C::A_CHUNKS;
      const int gm = m0 + r, gk = k0 + c * 8;
      T* dst = a_dst + swz<C::A_CHUNKS>(r, c) * 8;
      if constexpr (kVec) {
        const bool ok = gm < M && gk < k_end;
        cp_async16(smem_u32(dst), ok ? A + (int64_t)gm * K + gk : A, ok ? 16 : 0);
      } else {
        alignas(16) T v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] = (gm < M && gk + e < k_end) ? A[(int64_t)gm * K + gk + e] : from_float<T>(0.f);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(v);
      }
    }
#pragma unroll
    for (int i = 0; i < C::BK * C::B_CHUNKS / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      const int r = idx / C::B_CHUNKS, c = idx % C::B_CHUNKS;
      const int gk = k0 + r, gn = n0 + c * 8;
      T* dst = b_dst + swz<C::B_CHUNKS>(r, c) * 8;
      if constexpr (kVec) {
        const bool ok = gk < k_end && gn < N;
        cp_async16(smem_u32(dst), ok ? B + (int64_t)gk * N + gn : B, ok ? 16 : 0);
      } else {
        alignas(16) T v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e)
          v[e] = (gk < k_end && gn + e < N) ? B[(int64_t)gk * N + gn + e] : from_float<T>(0.f);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(v);
      }
    }
  };

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Prologue: STAGES-1 tiles in flight. Every iteration commits one group (possibly empty) so that
  // wait_group<STAGES-2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt visible to all; and every warp is done with the stage refilled below
    {
      const int next = kt + C::STAGES - 1;
      if (next < ktiles) load_stage(next, next % C::STAGES);
      cp_async_commit();
    }
    const int stage = kt % C::STAGES;
    const uint32_t a_base = smem_u32(sA + stage * C::A_STAGE);
    const uint32_t b_base = smem_u32(sB + stage * C::B_STAGE);
#pragma unroll
    for (int kk = 0; kk < C::BK / 16; ++kk) {
      uint32_t af[C::MT][4];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: rows 0-15 at k 8-15 -> a0..a3 in mma order
        const int r = warp_m * C::WTM + mt * 16 + (lane & 15);
        const int c = kk * 2 + (lane >> 4);
        ldmatrix_x4(af[mt], a_base + swz<C::A_CHUNKS>(r, c) * 16);
      }
      uint32_t bf[C::NT][2];
#pragma unroll
      for (int np = 0; np < C::NT / 2; ++np) {
        // matrices: (k 0-7, n-tile 2np), (k 8-15, 2np), (k 0-7, 2np+1), (k 8-15, 2np+1); .trans turns
        // the k-rows of row-major B into the "col" B fragment
        const int r = kk * 16 + (lane & 15);
        const int c = (warp_n * C::WTN + np * 16) / 8 + (lane >> 4);
        uint32_t t[4];
        ldmatrix_x4_trans(t, b_base + swz<C::B_CHUNKS>(r, c) * 16);
        bf[2 * np][0] = t[0];
        bf[2 * np][1] = t[1];
        bf[2 * np + 1][0] = t[2];
        bf[2 * np + 1][1] = t[3];
      }
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt) mma_16816<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }
  cp_async_wait<0>();  // nothing real is pending, but leave no copy behind

  // Epilogue: c0,c1 at (row lane/4, cols 2*(lane%4)+{0,1}); c2,c3 eight rows further down.
  const bool pairs = (N % 2) == 0;  // 4-byte stores need an even row pitch
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * C::WTM + mt * 16 + (lane >> 2) + half * 8;
      if (row >= M) continue;
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        const int col = n0 + warp_n * C::WTN + nt * 8 + (lane & 3) * 2;
        const float v0 = acc[mt][nt][2 * half], v1 = acc[mt][nt][2 * half + 1];
        if (partial) {
          float* p = partial + ((int64_t)blockIdx.z * M + row) * N + col;
          if (col < N) p[0] = v0;
          if (col + 1 < N) p[1] = v1;
        } else {
          T* p = Cout + (int64_t)row * N + col;
          if (pairs && col + 1 < N) {
            *reinterpret_cast<uint32_t*>(p) = pack2<T>(v0, v1);
          } else {
            if (col < N) p[0] = from_float<T>(v0);
            if (col + 1 < N) p[1] = from_float<T>(v1);
          }
        }
      }
    }
  }
}

// C = sum over splits of partial[z] (fixed order: the result does not depend on scheduling).
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, T* __restrict__ Cout, int64_t MN,
                                     int splits) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < MN; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += partial[z * MN + i];
    Cout[i] = from_float<T>(s);
  }
}

template <typename T, class C, bool kVec>
void launch_mma(const GemmParams& p, cudaStream_t stream, int splits_hint) {
  const auto& dev = device_info();
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  const int64_t tiles = ceil_div(M, C::BM) * ceil_div(N, C::BN);
  // Split K only when the tiles fill less than half of one wave (MIN_BLOCKS CTAs per SM), up to about
  // a full wave, keeping >= 4 k-tiles per split so the pipeline fills, and at most 16 splits. Partials
  // are splits*M*N*4 bytes: for the M <= 64 shapes this is for (e.g. M=64, N=4096: 13 splits, 13.6 MB,
  // L2-resident on H100's 50 MB) far less than B itself (32 MB at K=N=4096).
  int splits = splits_hint;
  if (splits <= 0) {
    splits = 1;
    const int64_t wave = static_cast<int64_t>(dev.sm_count) * C::MIN_BLOCKS;
    if (2 * tiles <= wave) {
      splits = static_cast<int>(ceil_div(wave, tiles));
      splits = static_cast<int>(std::min<int64_t>(splits, std::max<int64_t>(1, K / (4 * C::BK))));
      splits = std::min(splits, 16);
    }
  }
  const int k_per_split = static_cast<int>(ceil_div(ceil_div(K, splits), C::BK) * C::BK);
  splits = static_cast<int>(ceil_div(K, k_per_split));

  auto kernel = gemm_mma_kernel<T, C, kVec>;
  set_smem(kernel, C::SMEM, "cudaFuncSetAttribute(gemm_mma_kernel)");
  const dim3 grid(static_cast<unsigned>(tiles), 1, splits);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* c = static_cast<T*>(p.c);
  if (splits == 1) {
    kernel<<<grid, C::kThreads, C::SMEM, stream>>>(a, b, c, nullptr, M, N, K, k_per_split);
    check_launch("gemm_mma_kernel");
    return;
  }
  Scratch ws(sizeof(float) * splits * p.M * p.N, stream, "cudaMallocAsync(gemm split-K partials)");
  kernel<<<grid, C::kThreads, C::SMEM, stream>>>(a, b, c, ws.as<float>(), M, N, K, k_per_split);
  check_launch("gemm_mma_kernel (split-K)");
  const int64_t MN = p.M * p.N;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(MN, 256), 8LL * dev.sm_count));
  splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(ws.as<float>(), c, MN, splits);
  check_launch("splitk_reduce_kernel");
}

// ================================================================================================
// wgmma + TMA path (sm_90a). The kernel body exists only in the sm_90a device code; other targets
// compile an empty stub, and the host never launches it there (sm90a_available() below).
// ================================================================================================

namespace wg {
constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
constexpr int kConsumers = 2;                      // warpgroups doing math, 64 rows each
constexpr int kThreads = 128 * (kConsumers + 1);  // + one producer warpgroup
constexpr int A_BYTES = BM * BK * 2;               // 16 KB: one TMA box {64 k, 128 m}
constexpr int B_BOX_N = 64;                        // 128-byte swizzle: the inner box is at most 128 B
constexpr int B_BOX_BYTES = BK * B_BOX_N * 2;      // 8 KB: one TMA box {64 n, 64 k}
constexpr int B_BYTES = BK * BN * 2;               // 32 KB: four boxes side by side
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;     // 48 KB, the transaction count of one stage
// 4 stages x 48 KB = 192 KB + barriers + 1 KB alignment slack <= 227 KB: 1 CTA/SM, 3 stages in flight
// while one is consumed; 128x256 tiles give 2*128*256*64 FLOP per 48 KB = 85 FLOP/B of L2 traffic.
constexpr int SMEM = STAGES * STAGE_BYTES + 1024 + 2 * STAGES * 8;
static_assert(BM == 64 * kConsumers, "each consumer warpgroup owns 64 rows (wgmma m64)");
static_assert(BN % B_BOX_N == 0 && B_BYTES == B_BOX_BYTES * (BN / B_BOX_N), "B stage = whole TMA boxes");
static_assert(BK * 2 == 128, "A rows are exactly one 128-byte swizzle row");
static_assert(SMEM <= 227 * 1024, "fits the H100 opt-in shared memory");
}  // namespace wg

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_SM90A 1
#endif

#if defined(PK_SM90A)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          dst),
      "l"(map), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// wgmma shared-memory descriptor: start address, leading/stride byte offsets (all >> 4), 128-byte swizzle.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16;
  d |= static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // layout type 1 = 128-byte swizzle
  return d;
}

#define PK_D4(i) "+f"(d[i]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3])
#define PK_D16(i) PK_D4(i), PK_D4((i) + 4), PK_D4((i) + 8), PK_D4((i) + 12)
#define PK_D64(i) PK_D16(i), PK_D16((i) + 16), PK_D16((i) + 32), PK_D16((i) + 48)
#define PK_WGMMA_REGS                                                                                           \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
  "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55," \
  "%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82," \
  "%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107," \
  "%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}"

// D(64x256, fp32) += A(64x16, K-major in smem) . B(16x256, N-major in smem: imm-trans-b = 1).
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db);
template <>
__device__ __forceinline__ void wgmma_m64n256k16<__nv_bfloat16>(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " PK_WGMMA_REGS
               ", %128, %129, p, 1, 1, 0, 1;\n}\n"
               : PK_D64(0), PK_D64(64)
               : "l"(da), "l"(db));
}
template <>
__device__ __forceinline__ void wgmma_m64n256k16<__half>(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " PK_WGMMA_REGS
               ", %128, %129, p, 1, 1, 0, 1;\n}\n"
               : PK_D64(0), PK_D64(64)
               : "l"(da), "l"(db));
}
#undef PK_D4
#undef PK_D16
#undef PK_D64
#undef PK_WGMMA_REGS
#endif  // PK_SM90A

template <typename T>
__global__ void __launch_bounds__(wg::kThreads, 1)
    gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                      T* __restrict__ Cout, int M, int N, int K) {
#if defined(PK_SM90A)
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // 128-byte swizzle atoms are 1024 bytes and must start 1024-aligned (the descriptors' base offset is 0).
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sA = base;                                 // STAGES x 16 KB
  const uint32_t sB = base + wg::STAGES * wg::A_BYTES;      // STAGES x 32 KB
  const uint32_t bars = sB + wg::STAGES * wg::B_BYTES;      // full[STAGES], empty[STAGES], 8 B each
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (wg::STAGES + s); };

  const int tiles_m = (M + wg::BM - 1) / wg::BM;
  const int tiles_n = (N + wg::BN - 1) / wg::BN;
  int tm, tn;
  tile_of(blockIdx.x, tiles_m, tiles_n, tm, tn);
  const int m0 = tm * wg::BM, n0 = tn * wg::BN;
  const int ktiles = (K + wg::BK - 1) / wg::BK;  // TMA zero-fills the K tail (and the M/N edges)

  const int wg_idx = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < wg::STAGES; ++s) {
      mbar_init(full(s), 1);                      // the producer's arrive.expect_tx
      mbar_init(empty(s), 128 * wg::kConsumers);  // every consumer thread releases the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  if (wg_idx == 0) {
    // Producer warpgroup: one thread issues all copies; the rest give their registers away.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % wg::STAGES;
        if (kt >= wg::STAGES) mbar_wait(empty(s), ((kt / wg::STAGES) - 1) & 1);
        mbar_expect_tx(full(s), wg::STAGE_BYTES);  // OOB parts of a box are zero-filled and still counted
        tma_load_2d(sA + s * wg::A_BYTES, &map_a, full(s), kt * wg::BK, m0);
#pragma unroll
        for (int j = 0; j < wg::BN / wg::B_BOX_N; ++j)
          tma_load_2d(sB + s * wg::B_BYTES + j * wg::B_BOX_BYTES, &map_b, full(s), n0 + j * wg::B_BOX_N,
                      kt * wg::BK);
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = wg_idx - 1;  // rows 64c .. 64c+63 of the tile
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;
    for (int kt = 0; kt < ktiles; ++kt) {
      const int s = kt % wg::STAGES;
      mbar_wait(full(s), (kt / wg::STAGES) & 1);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < wg::BK / 16; ++kk) {
        // A: K-major, 128 B rows, 8-row atoms 1024 B apart (SBO); a k16 step is 32 B into the row.
        const uint64_t da = wgmma_desc(sA + s * wg::A_BYTES + c * 64 * 128 + kk * 32, 16, 1024);
        // B: N-major; atoms of 64 n x 8 k (1024 B); next 8 k: SBO = 1024 B; next 64 n: the next TMA
        // box, LBO = 8 KB; a k16 step is 16 rows of 128 B.
        const uint64_t db = wgmma_desc(sB + s * wg::B_BYTES + kk * 16 * 128, wg::B_BOX_BYTES, 1024);
        wgmma_m64n256k16<T>(d, da, db);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      mbar_arrive(empty(s));
    }
    // Accumulator layout (per warp w of the warpgroup, as mma.sync's C per n8 block j):
    // d[4j+0..1] at (16w + lane/4, 8j + 2*(lane%4) + 0..1); d[4j+2..3] eight rows further down.
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int row0 = m0 + c * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = n0 + 8 * j + 2 * (lane % 4);
      if (col >= N) continue;  // N % 8 == 0 on this path: col + 1 < N too
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 8 * h;
        if (row < M)
          *reinterpret_cast<uint32_t*>(Cout + (int64_t)row * N + col) = pack2<T>(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
      }
    }
  }
#endif  // PK_SM90A
}

// A marker only the sm_90a device code carries (16 bytes of static shared memory): the host reads the
// kernel attributes of the image the driver picked for this GPU and so learns whether the wgmma kernel
// is real there. No launch, no synchronization (safe during graph capture).
__global__ void sm90a_probe_kernel(int* out) {
#if defined(PK_SM90A)
  __shared__ int marker[4];
  marker[threadIdx.x & 3] = threadIdx.x;
  __syncthreads();
  if (out) *out = marker[(threadIdx.x + 1) & 3];
#endif
}

bool sm90a_available() {
  static int cached[64];  // 0 unknown, 1 yes, 2 no; per device
  const auto& dev = device_info();
  if (dev.device < 0 || dev.device >= 64) return false;
  if (cached[dev.device] == 0) {
    cudaFuncAttributes attr{};
    const bool ok = dev.cc_major == 9 && cudaFuncGetAttributes(&attr, sm90a_probe_kernel) == cudaSuccess &&
                    attr.sharedSizeBytes >= 16 && dev.max_smem_optin >= wg::SMEM;
    cudaGetLastError();
    cached[dev.device] = ok ? 1 : 2;
  }
  return cached[dev.device] == 1;
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (q != cudaDriverEntryPointSuccess || !f)
      throw std::runtime_error("pykernels CUDA: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// 2-D row-major tensor [rows, cols] -> TMA map with a {box_cols, box_rows} box, 128-byte swizzle.
template <typename T>
CUtensorMap make_map(const void* ptr, int64_t rows, int64_t cols, uint32_t box_cols, uint32_t box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * 2)};  // bytes; a multiple of 16
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode_fn()(&map, dt, 2, const_cast<void*>(ptr), dims, strides, box, elem,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error("pykernels CUDA: cuTensorMapEncodeTiled failed for gemm (CUresult " +
                             std::to_string(static_cast<int>(r)) + ")");
  return map;
}

template <typename T>
void launch_wgmma(const GemmParams& p, cudaStream_t stream) {
  const CUtensorMap map_a = make_map<T>(p.a, p.M, p.K, wg::BK, wg::BM);
  const CUtensorMap map_b = make_map<T>(p.b, p.K, p.N, wg::B_BOX_N, wg::BK);
  auto kernel = gemm_wgmma_kernel<T>;
  set_smem(kernel, wg::SMEM, "cudaFuncSetAttribute(gemm_wgmma_kernel)");
  const int64_t tiles = ceil_div(p.M, wg::BM) * ceil_div(p.N, wg::BN);
  kernel<<<static_cast<unsigned>(tiles), wg::kThreads, wg::SMEM, stream>>>(
      map_a, map_b, static_cast<T*>(p.c), static_cast<int>(p.M), static_cast<int>(p.N), static_cast<int>(p.K));
  check_launch("gemm_wgmma_kernel");
}

// PK_CUDA_GEMM=auto (default) | wgmma | mma | scalar: forces a path, for tests and comparisons
// (tools/gpu_check.sh runs the smoke test under each). A forced path that cannot run raises.
enum class Path { Auto, Wgmma, Mma, Scalar };
Path forced_path() {
  static const Path p = [] {
    const char* e = std::getenv("PK_CUDA_GEMM");
    if (!e || !*e || !std::strcmp(e, "auto")) return Path::Auto;
    if (!std::strcmp(e, "wgmma")) return Path::Wgmma;
    if (!std::strcmp(e, "mma")) return Path::Mma;
    if (!std::strcmp(e, "scalar")) return Path::Scalar;
    throw std::invalid_argument(std::string("PK_CUDA_GEMM must be auto, wgmma, mma or scalar, got '") + e + "'");
  }();
  return p;
}

template <typename T>
void gemm_typed(const GemmParams& p, cudaStream_t stream) {
  const bool vec = p.K % 8 == 0 && p.N % 8 == 0 && aligned16(p.a) && aligned16(p.b);
  const Path forced = forced_path();
  const auto& dev = device_info();
  if (forced == Path::Wgmma || (forced == Path::Auto && vec && sm90a_available() &&
                                ceil_div(p.M, wg::BM) * ceil_div(p.N, wg::BN) >= dev.sm_count)) {
    if (!vec || !sm90a_available())
      throw std::invalid_argument("pykernels CUDA gemm: PK_CUDA_GEMM=wgmma needs an sm_90a build on a 9.0 GPU, "
                                  "K % 8 == 0, N % 8 == 0 and 16-byte aligned operands");
    launch_wgmma<T>(p, stream);
    return;
  }
  if (forced == Path::Scalar || !vec) {
    launch_mma<T, CfgLarge, false>(p, stream, 0);
    return;
  }
  if (p.M <= 16)
    launch_mma<T, CfgSmall, true>(p, stream, 0);
  else if (p.M <= 64)
    launch_mma<T, CfgMid, true>(p, stream, 0);
  else
    launch_mma<T, CfgLarge, true>(p, stream, 0);
}

}  // namespace

void gemm(const GemmParams& p, std::uintptr_t stream) {
  if (p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX)
    throw std::invalid_argument("pykernels CUDA gemm: M, N and K must each be below 2**31");
  dispatch_half_types(p.dtype, "gemm", [&](auto tag) { gemm_typed<decltype(tag)>(p, as_stream(stream)); });
}

}  // namespace pk::cuda
