// attention forward, flash-style (FlashAttention-2's loop order), sm_80+ (mma.sync; also what runs on
// sm_90, where a wgmma version would be faster, see notes/cuda.md).
//
// One CTA per (query block of kBlockM rows, query head, batch). Each warp owns 16*kMT query rows. The
// CTA walks the key/value sequence in tiles of kBlockN rows, double-buffered in shared memory with
// cp.async (tile j+1 lands while tile j is used). Per tile: S = Q K^T with mma.sync m16n8k16 (Q and K
// fragments by ldmatrix), causal/sequence-end mask, online softmax in registers (base-2 exponentials,
// running max and sum per row), P re-packed from the S accumulators straight into A fragments, then
// O += P V (V fragments by ldmatrix.trans). Causal: key tiles past the diagonal are never loaded, and
// query blocks run in reverse order so the longest ones start first.
#include <cmath>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace pk::cuda {
namespace {

template <int D_, int WARPS_, int MT_, int BLOCK_N_>
struct AttnCfg {
  static constexpr int D = D_, kWarps = WARPS_, kMT = MT_, kBlockN = BLOCK_N_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * kMT * 16;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kNT = kBlockN / 8;   // n8 tiles of S per warp row-block
  static constexpr int kDT = D / 8;         // n8 tiles of O
  static constexpr int Q_ELEMS = kBlockM * D;
  static constexpr int KV_ELEMS = kBlockN * D;
  static constexpr int SMEM = (Q_ELEMS + 4 * KV_ELEMS) * 2;  // Q + 2 stages x (K, V)
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(kBlockN % 16 == 0, "keys in k16 steps of P.V");
  static_assert((kBlockM * kChunks) % kThreads == 0 && (kBlockN * kChunks) % kThreads == 0, "whole chunks per thread");
  static_assert(SMEM <= 227 * 1024, "fits an SM");
};

// Both: 128 query rows x 64 keys per step. Register use decided the warp layout (ptxas -v, sm_90a):
//  D=64:  4 warps of 32 rows (kMT = 2): each K/V fragment read from shared memory feeds two m16 tiles,
//         half the smem traffic per FLOP of 16 rows per warp; 224-230 registers, no spills; 48 KB smem.
//  D=128: 8 warps of 16 rows (kMT = 1): 174 registers, no spills. kMT = 2 needs 255 and spills
//         (144 B with 64-key tiles, 40-56 B with 32-key tiles). Q 32 KB + K,V 2x2x16 KB = 96 KB smem.
template <int D>
using Cfg = std::conditional_t<D == 64, AttnCfg<64, 4, 2, 64>, AttnCfg<128, 8, 1, 64>>;

constexpr float kLog2e = 1.4426950408889634f;

template <typename T, class C, bool kCausal>
__global__ void __launch_bounds__(C::kThreads)
    attention_fwd_kernel(const T* __restrict__ Q, const T* __restrict__ Kt, const T* __restrict__ Vt,
                         T* __restrict__ O, int S, int Hq, int Hkv, float scale_log2) {
  extern __shared__ __align__(128) uint8_t smem_attn[];
  T* sQ = reinterpret_cast<T*>(smem_attn);
  T* sK = sQ + C::Q_ELEMS;         // 2 stages
  T* sV = sK + 2 * C::KV_ELEMS;    // 2 stages

  const int num_m_blocks = gridDim.x;
  const int m_block = kCausal ? num_m_blocks - 1 - blockIdx.x : blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hq / Hkv);
  const int64_t q_off = ((int64_t)b * Hq + h) * S * C::D;
  const int64_t kv_off = ((int64_t)b * Hkv + hk) * S * C::D;
  const T* q = Q + q_off;
  const T* k = Kt + kv_off;
  const T* v = Vt + kv_off;
  T* o = O + q_off;

  const int m0 = m_block * C::kBlockM;
  const int n_end = kCausal ? min(S, m0 + C::kBlockM) : S;
  const int n_tiles = (n_end + C::kBlockN - 1) / C::kBlockN;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 16-byte chunks; rows past the sequence are zero-filled (and their address clamped to row 0).
  auto load_rows = [&](T* dst, const T* src, int row0, int rows) {
#pragma unroll
    for (int i = 0; i < rows * C::kChunks / C::kThreads; ++i) {
      const int idx = tid + i * C::kThreads;
      const int r = idx / C::kChunks, c = idx % C::kChunks;
      const bool ok = row0 + r < S;
      cp_async16(smem_u32(dst + swz<C::kChunks>(r, c) * 8), src + (ok ? (int64_t)(row0 + r) * C::D + c * 8 : 0),
                 ok ? 16 : 0);
    }
  };

  load_rows(sQ, q, m0, C::kBlockM);
  load_rows(sK, k, 0, C::kBlockN);
  load_rows(sV, v, 0, C::kBlockN);
  cp_async_commit();

  float acc_o[C::kMT][C::kDT][4];
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int d = 0; d < C::kDT; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][d][e] = 0.f;
  float row_max[C::kMT][2], row_sum[C::kMT][2];  // rows lane/4 and lane/4 + 8 of each m16 tile
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[mt][hh] = -INFINITY;
      row_sum[mt][hh] = 0.f;
    }

  const uint32_t q_base = smem_u32(sQ);
  const int warp_row0 = warp * C::kMT * 16;  // first row of this warp inside the block

  for (int j = 0; j < n_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_tiles) {
      load_rows(sK + (stage ^ 1) * C::KV_ELEMS, k, (j + 1) * C::kBlockN, C::kBlockN);
      load_rows(sV + (stage ^ 1) * C::KV_ELEMS, v, (j + 1) * C::kBlockN, C::kBlockN);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the copy just issued: Q and tile j
    __syncthreads();

    const uint32_t k_base = smem_u32(sK + stage * C::KV_ELEMS);
    const uint32_t v_base = smem_u32(sV + stage * C::KV_ELEMS);

    // ---- S = Q K^T ----
    float s[C::kMT][C::kNT][4];
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < C::D / 16; ++kk) {
      uint32_t qf[C::kMT][4];
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt)
        ldmatrix_x4(qf[mt], q_base + swz<C::kChunks>(warp_row0 + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)) * 16);
#pragma unroll
      for (int np = 0; np < C::kNT / 2; ++np) {
        // K rows are keys with d contiguous = the "col" B operand of Q.K^T without a transpose.
        // matrices: (keys 0-7, d lo), (keys 0-7, d hi), (keys 8-15, d lo), (keys 8-15, d hi)
        const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int chunk = kk * 2 + ((lane >> 3) & 1);
        uint32_t kf[4];
        ldmatrix_x4(kf, k_base + swz<C::kChunks>(key, chunk) * 16);
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
          mma_16816<T>(s[mt][2 * np], qf[mt], kf[0], kf[1]);
          mma_16816<T>(s[mt][2 * np + 1], qf[mt], kf[2], kf[3]);
        }
      }
    }

    // ---- scale (into base-2 units; a negative scale is legal, so before the max), then mask only the
    // tiles that cross the sequence end or the diagonal ----
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
    const int n0 = j * C::kBlockN;
    const bool need_mask = n0 + C::kBlockN > S || (kCausal && n0 + C::kBlockN - 1 > m0 + warp_row0);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
            const int row = m0 + warp_row0 + mt * 16 + (lane >> 2) + (e >> 1) * 8;
            if (key >= S || (kCausal && key > row)) s[mt][nt][e] = -INFINITY;
          }
    }

    // ---- online softmax (base 2) ----
    uint32_t pf[C::kMT][C::kBlockN / 16][4];
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share a row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[mt][hh], mx);
        // A row that has seen only masked keys keeps max -inf: use 0 so that exp2(-inf - 0) = 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(row_max[mt][hh] - m_use);
        row_max[mt][hh] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) {
          const float p0 = exp2f(s[mt][nt][2 * hh] - m_use);
          const float p1 = exp2f(s[mt][nt][2 * hh + 1] - m_use);
          s[mt][nt][2 * hh] = p0;
          s[mt][nt][2 * hh + 1] = p1;
          sum += p0 + p1;
        }
        row_sum[mt][hh] = row_sum[mt][hh] * alpha + sum;  // per-thread partial; the quad is summed at the end
#pragma unroll
        for (int d = 0; d < C::kDT; ++d) {
          acc_o[mt][d][2 * hh] *= alpha;
          acc_o[mt][d][2 * hh + 1] *= alpha;
        }
      }
      // C fragments of two adjacent n8 tiles are exactly the A fragment of one k16 step.
#pragma unroll
      for (int kk = 0; kk < C::kBlockN / 16; ++kk) {
        pf[mt][kk][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][kk][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][kk][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][kk][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < C::kBlockN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < C::kDT / 2; ++dp) {
        // V rows are keys with d contiguous: .trans gives the "col" B fragment (k = key, n = d).
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_base + swz<C::kChunks>(kk * 16 + (lane & 15), dp * 2 + (lane >> 4)) * 16);
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], pf[mt][kk], vf[0], vf[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], pf[mt][kk], vf[2], vf[3]);
        }
      }
    }
    __syncthreads();  // all warps are done with this stage before the next iteration refills it
  }

  // ---- normalize and store ----
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = row_sum[mt][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : (l == l ? 0.f : l);  // keep a NaN a NaN
      const int row = m0 + warp_row0 + mt * 16 + (lane >> 2) + hh * 8;
      if (row >= S) continue;
      T* dst = o + (int64_t)row * C::D + (lane & 3) * 2;
#pragma unroll
      for (int d = 0; d < C::kDT; ++d)
        *reinterpret_cast<uint32_t*>(dst + d * 8) = pack2<T>(acc_o[mt][d][2 * hh] * inv, acc_o[mt][d][2 * hh + 1] * inv);
    }
  }
}

template <typename T, int D, bool kCausal>
void launch(const AttentionParams& p, cudaStream_t stream) {
  using C = Cfg<D>;
  auto kernel = attention_fwd_kernel<T, C, kCausal>;
  set_smem(kernel, C::SMEM, "cudaFuncSetAttribute(attention_fwd_kernel)");
  const dim3 grid(static_cast<unsigned>(ceil_div(p.S, C::kBlockM)), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(p.B));
  kernel<<<grid, C::kThreads, C::SMEM, stream>>>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),
                                                 static_cast<const T*>(p.v), static_cast<T*>(p.o),
                                                 static_cast<int>(p.S), static_cast<int>(p.Hq),
                                                 static_cast<int>(p.Hkv), p.scale * kLog2e);
  check_launch("attention_fwd_kernel");
}

}  // namespace

void attention(const AttentionParams& p, std::uintptr_t stream) {
  if (p.D != 64 && p.D != 128)
    throw std::invalid_argument("pykernels CUDA attention: head dim " + std::to_string(p.D) +
                                " is not supported (64 and 128 are)");
  if (p.S > INT32_MAX || p.Hq > 65535 || p.B > 65535)
    throw std::invalid_argument("pykernels CUDA attention: S must be below 2**31, Hq and B at most 65535");
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o))
    throw std::invalid_argument("pykernels CUDA attention: q, k, v and o must be 16-byte aligned");
  const cudaStream_t s = as_stream(stream);
  dispatch_half_types(p.dtype, "attention", [&](auto tag) {
    using T = decltype(tag);
    if (p.D == 64) {
      p.causal ? launch<T, 64, true>(p, s) : launch<T, 64, false>(p, s);
    } else {
      p.causal ? launch<T, 128, true>(p, s) : launch<T, 128, false>(p, s);
    }
  });
}

}  // namespace pk::cuda
