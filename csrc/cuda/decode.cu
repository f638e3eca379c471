// decode: one query token per sequence against a KV cache (contiguous or paged), split-KV
// ("flash-decoding"). Bound by memory bandwidth: every K and V row of every sequence is read once.
//
// decode_partial_kernel: one CTA per (chunk of kChunk tokens, kv head x tile of query heads, sequence).
//   The G query heads of a GQA group that share the kv head are handled together, so K/V are read once
//   per group. D/8 lanes cover one token row with 16-byte loads (D=128: 16 lanes, 2 tokens per warp
//   instruction, 512 contiguous bytes); each thread keeps kU tokens' K and V loads in flight before the
//   first use. Scores are reduced over the lanes of a token with xor-shuffles; each lane group keeps an
//   online softmax state (max, sum, 8 accumulated output dims) per head, merged across lane groups
//   (shuffles) and warps (shared memory) at the end. Chunks past a sequence's length exit at once;
//   rows past the length are never read (they may hold anything, NaN included).
// decode_reduce_kernel: combines the per-chunk (max, sum, unnormalized output) of each (b, head).
// With a single chunk the partial kernel writes the normalized output itself and no scratch is used.
#include <algorithm>
#include <string>

#include "cuda/common.cuh"
#include "cuda/cuda.h"

namespace pk::cuda {
namespace {

constexpr int kWarps = 4;  // 128 threads: small CTAs, many per SM (the grid supplies the parallelism)
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int G>
struct DecCfg {
  static constexpr int kLanes = D / 8;        // lanes per token row, 16 bytes each
  static constexpr int kTPW = 32 / kLanes;    // tokens per warp per load instruction
  // Loads in flight per thread (K and V each): more when fewer heads share the registers. ptxas -v
  // (sm_90a) keeps all of these under 128 registers, so >= 4 CTAs (16 warps) fit per SM.
  static constexpr int kU = G == 1 ? 8 : (G <= 4 ? 4 : 2);
  static constexpr int kStep = kWarps * kTPW * kU;  // tokens per CTA iteration
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "head tiles of 1, 2, 4 or 8");
};

// Minimum tokens per chunk: 256 tokens x D=128 x 2 (K,V) x 2 B = 128 KB read per CTA against a 4 KB
// (G=8) partial written and read back: the split costs at most ~3% extra traffic.
constexpr int kMinChunk = 256;

__device__ __forceinline__ void merge_state(float& m, float& l, float* acc, float m_o, float l_o, const float* acc_o) {
  const float m_new = fmaxf(m, m_o);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;  // both empty: weights 0, not NaN
  const float a = exp2f(m - m_use), b = exp2f(m_o - m_use);
  l = a * l + b * l_o;
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = a * acc[e] + b * acc_o[e];
  m = m_new;
}

template <typename T, int D, int G, bool kPaged>
__global__ void __launch_bounds__(kThreads)
    decode_partial_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                          T* __restrict__ out, const int32_t* __restrict__ context_lens,
                          const int32_t* __restrict__ block_table, int Hq, int Hkv, int head_tiles,
                          int block_size, int max_blocks, int num_blocks, int chunk_len, int num_chunks, float scale_log2,
                          float* __restrict__ part_o, float2* __restrict__ part_ml) {
  using C = DecCfg<D, G>;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / head_tiles;
  const int g0 = (blockIdx.y % head_tiles) * G;
  const int chunk = blockIdx.x;
  const int group = Hq / Hkv;
  const int len = context_lens[b];
  const int t_begin = chunk * chunk_len;
  if (t_begin >= len) return;  // past this sequence's end (the reducer never reads this chunk)
  // Lengths past the capacity (bad input the host could not see) are clamped: never read out of bounds.
  const int t_end = min(min(len, max_blocks * block_size), t_begin + chunk_len);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lg = lane / C::kLanes;  // token slot inside the warp
  const int li = lane % C::kLanes;  // which 8 dims

  // q of the G heads, pre-scaled into base-2 softmax units.
  float qf[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g0 + g < group) {
      const uint4 raw = *reinterpret_cast<const uint4*>(q + ((int64_t)b * Hq + hk * group + g0 + g) * D + li * 8);
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2<T>(w[e]);
        qf[g][2 * e] = f.x * scale_log2;
        qf[g][2 * e + 1] = f.y * scale_log2;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[g][e] = 0.f;
    }
  }

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  const int64_t head_rows = (int64_t)block_size;  // rows of one (block, kv head)
  auto row_offset = [&](int t) -> int64_t {
    int64_t blk, row;
    if constexpr (kPaged) {
      blk = min(max(block_table[(int64_t)b * max_blocks + t / block_size], 0), num_blocks - 1);
      row = t % block_size;
    } else {
      blk = b;
      row = t;
    }
    return ((blk * Hkv + hk) * head_rows + row) * D + li * 8;
  };

  for (int base = t_begin; base < t_end; base += C::kStep) {
    uint4 kr[C::kU], vr[C::kU];
    uint32_t valid = 0;  // bit u: token u of this lane group exists
#pragma unroll
    for (int u = 0; u < C::kU; ++u) {
      const int t = base + (u * kWarps + warp) * C::kTPW + lg;
      if (t < t_end) {
        valid |= 1u << u;
        const int64_t off = row_offset(t);
        kr[u] = ld_stream16(kc + off);
        vr[u] = ld_stream16(vc + off);
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[C::kU][G];
#pragma unroll
    for (int u = 0; u < C::kU; ++u) {
      const uint32_t w[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
      float kf[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2<T>(w[e]);
        kf[2 * e] = f.x;
        kf[2 * e + 1] = f.y;
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
#pragma unroll
        for (int off = C::kLanes / 2; off >= 1; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        s[u][g] = (valid >> u) & 1u ? d : -INFINITY;
      }
    }
    float vf[C::kU][8];
#pragma unroll
    for (int u = 0; u < C::kU; ++u) {
      const uint32_t w[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2<T>(w[e]);
        vf[u][2 * e] = f.x;
        vf[u][2 * e + 1] = f.y;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int u = 1; u < C::kU; ++u) mx = fmaxf(mx, s[u][g]);
      const float m_new = fmaxf(m[g], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[g] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < C::kU; ++u) {
        const float p = exp2f(s[u][g] - m_use);  // invalid token: exp2(-inf) = 0, and its v is 0
        sum += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(p, vf[u][e], acc[g][e]);
      }
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
    }
  }

  // Merge the lane groups of the warp (same dims, different tokens).
#pragma unroll
  for (int off = C::kLanes; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[g], off);
      float acc_o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc_o[e] = __shfl_xor_sync(0xffffffffu, acc[g][e], off);
      merge_state(m[g], l[g], acc[g], m_o, l_o, acc_o);
    }
  }

  // Merge the warps through shared memory.
  __shared__ float sm_m[kWarps][G], sm_l[kWarps][G];
  __shared__ float sm_acc[kWarps][G][D];
  if (lg == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_acc[warp][g][li * 8 + e] = acc[g][e];
      if (li == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    if (g0 + g >= group) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float o = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(sm_m[w][g] - m_use);
      o += a * sm_acc[w][g][d];
      L += a * sm_l[w][g];
    }
    const int64_t bh = (int64_t)b * Hq + hk * group + g0 + g;
    if (num_chunks == 1) {
      out[bh * D + d] = from_float<T>(o / L);
    } else {
      part_o[(bh * num_chunks + chunk) * D + d] = o;
      if (d == 0) part_ml[bh * num_chunks + chunk] = make_float2(mx, L);
    }
  }
}

// One CTA per (head, sequence), one thread per output dim.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_reduce_kernel(const float* __restrict__ part_o,
                                                          const float2* __restrict__ part_ml, T* __restrict__ out,
                                                          const int32_t* __restrict__ context_lens, int Hq,
                                                          int chunk_len, int num_chunks) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int len = context_lens[b];
  const int n = min(num_chunks, (len + chunk_len - 1) / chunk_len);
  const int64_t bh = (int64_t)b * Hq + h;
  const float2* ml = part_ml + bh * num_chunks;
  const float* po = part_o + bh * num_chunks * D + d;
  float mx = -INFINITY;
  for (int c = 0; c < n; ++c) mx = fmaxf(mx, ml[c].x);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float o = 0.f, L = 0.f;
  for (int c = 0; c < n; ++c) {
    const float a = exp2f(ml[c].x - m_use);
    o += a * po[(int64_t)c * D];
    L += a * ml[c].y;
  }
  out[bh * D + d] = from_float<T>(o / L);
}

template <typename T, int D, int G>
void launch(const DecodeParams& p, cudaStream_t stream) {
  using C = DecCfg<D, G>;
  const auto& dev = device_info();
  const int group = static_cast<int>(p.Hq / p.Hkv);
  const int head_tiles = (group + G - 1) / G;
  const int64_t capacity = p.max_blocks * p.block_size;  // longest possible context
  const int64_t base_ctas = p.B * p.Hkv * head_tiles;
  // ~4 CTAs per SM in one wave: chunks = ceil(4*SMs / base), each a whole number of CTA steps and at
  // least kMinChunk tokens (or the whole capacity, if shorter).
  const int64_t want = std::max<int64_t>(1, ceil_div(4LL * dev.sm_count, base_ctas));
  int64_t chunk = ceil_div(ceil_div(capacity, want), C::kStep) * C::kStep;
  chunk = std::max<int64_t>(chunk, ceil_div(kMinChunk, C::kStep) * C::kStep);
  chunk = std::min<int64_t>(chunk, ceil_div(capacity, C::kStep) * C::kStep);
  const int num_chunks = static_cast<int>(ceil_div(capacity, chunk));
  const dim3 grid(num_chunks, static_cast<unsigned>(p.Hkv * head_tiles), static_cast<unsigned>(p.B));
  const float scale_log2 = p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  const bool paged = p.block_table != nullptr;
  auto kernel = paged ? decode_partial_kernel<T, D, G, true> : decode_partial_kernel<T, D, G, false>;
  const int Hq = static_cast<int>(p.Hq), Hkv = static_cast<int>(p.Hkv);
  const int bs = static_cast<int>(p.block_size), mb = static_cast<int>(p.max_blocks);
  const int nb = static_cast<int>(std::min<int64_t>(p.num_blocks, INT32_MAX));
  if (num_chunks == 1) {
    kernel<<<grid, kThreads, 0, stream>>>(q, k, v, o, p.context_lens, p.block_table, Hq, Hkv, head_tiles, bs, mb, nb,
                                          static_cast<int>(chunk), 1, scale_log2, nullptr, nullptr);
    check_launch("decode_partial_kernel");
    return;
  }
  const int64_t rows = p.B * p.Hq * num_chunks;
  Scratch po(sizeof(float) * rows * D, stream, "cudaMallocAsync(decode partial outputs)");
  Scratch pml(sizeof(float2) * rows, stream, "cudaMallocAsync(decode partial max/sum)");
  kernel<<<grid, kThreads, 0, stream>>>(q, k, v, o, p.context_lens, p.block_table, Hq, Hkv, head_tiles, bs, mb, nb,
                                        static_cast<int>(chunk), num_chunks, scale_log2, po.as<float>(),
                                        pml.as<float2>());
  check_launch("decode_partial_kernel");
  decode_reduce_kernel<T, D><<<dim3(Hq, static_cast<unsigned>(p.B)), D, 0, stream>>>(
      po.as<float>(), pml.as<float2>(), o, p.context_lens, Hq, static_cast<int>(chunk), num_chunks);
  check_launch("decode_reduce_kernel");
}

template <typename T, int D>
void launch_d(const DecodeParams& p, cudaStream_t stream) {
  const int64_t group = p.Hq / p.Hkv;
  if (group == 1)
    launch<T, D, 1>(p, stream);
  else if (group == 2)
    launch<T, D, 2>(p, stream);
  else if (group <= 4)
    launch<T, D, 4>(p, stream);
  else
    launch<T, D, 8>(p, stream);  // groups > 8 run in tiles of 8 heads (K/V re-read per tile)
}

}  // namespace

void decode(const DecodeParams& p, std::uintptr_t stream) {
  if (p.D != 64 && p.D != 128)
    throw std::invalid_argument("pykernels CUDA decode: head dim " + std::to_string(p.D) +
                                " is not supported (64 and 128 are)");
  if (p.B > 65535 || p.Hq > 65535 || p.max_blocks * p.block_size > INT32_MAX)
    throw std::invalid_argument("pykernels CUDA decode: B and Hq must be at most 65535, the capacity below 2**31");
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v))
    throw std::invalid_argument("pykernels CUDA decode: q, k_cache and v_cache must be 16-byte aligned");
  const cudaStream_t s = as_stream(stream);
  dispatch_half_types(p.dtype, "decode", [&](auto tag) {
    using T = decltype(tag);
    p.D == 64 ? launch_d<T, 64>(p, s) : launch_d<T, 128>(p, s);
  });
}

}  // namespace pk::cuda
