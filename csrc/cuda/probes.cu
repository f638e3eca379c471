// Hardware peak probes of a CUDA GPU: what the silicon can do, as the denominator of "% of peak".
// UNVERIFIED ON A GPU: written and compiled for sm_80 and sm_90a on a machine without one.
//
// Compute: every thread runs a register-resident loop of independent multiply-adds in inline PTX (asm
//   volatile, so nvcc can neither merge the chains nor drop the loop):
//   fma_fp32  8 chains of fma.rn.f32 per thread, 4 blocks of 256 threads per SM (FMA latency 4 cycles x
//             1 warp-instruction per cycle per scheduler = 4 independent instructions per scheduler needed;
//             8 warps per scheduler x 8 chains gives far more).
//   mma_bf16 / mma_fp16  4 independent mma.sync.m16n8k16 (fp32 accumulate) per warp, 8 warps per block,
//             2 blocks per SM: 16 tensor-core instructions in flight per sub-core. On sm_90 mma.sync does
//             not reach the wgmma peak (989 TFLOP/s dense bf16 on H100 SXM needs wgmma from shared memory);
//             a wgmma loop for sm_90a is the next step, so until then this probe reads low on Hopper.
// Memory: read (sum of float4 loads) and copy (float4) over buffers of max(1 GiB, 4 x L2), grid-stride,
//   timed with CUDA events, best of `reps` after one warm-up; bytes read + written.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/probes.h"

namespace pk::cuda {
namespace {

constexpr int kFmaChains = 8;
constexpr int kFmaThreads = 256;
constexpr int kFmaBlocksPerSm = 4;
constexpr int kMmaChains = 4;
constexpr int kMmaThreads = 256;
constexpr int kMmaBlocksPerSm = 2;
constexpr int kTrials = 5;
static_assert(kMmaThreads % 32 == 0, "mma.sync runs per warp");

__global__ void fma_fp32_kernel(long long iters, float seed, float* out) {
  float acc[kFmaChains];
#pragma unroll
  for (int j = 0; j < kFmaChains; ++j) acc[j] = seed * float(threadIdx.x + j);
  const float a = seed + 1.0f, b = seed * 0.5f;
  for (long long i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kFmaChains; ++j) asm volatile("fma.rn.f32 %0, %1, %2, %0;" : "+f"(acc[j]) : "f"(a), "f"(b));
  }
  float s = 0;
#pragma unroll
  for (int j = 0; j < kFmaChains; ++j) s += acc[j];
  if (s == 1234.5f) out[blockIdx.x * blockDim.x + threadIdx.x] = s;  // never true for seed 0; keeps acc live
}

template <bool kBf16>
__global__ void mma_kernel(long long iters, unsigned seed, float* out) {
  float d[kMmaChains][4];
#pragma unroll
  for (int j = 0; j < kMmaChains; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) d[j][r] = 0.0f;
  const unsigned a0 = seed, a1 = seed ^ 1u, a2 = seed ^ 2u, a3 = seed ^ 3u, b0 = seed ^ 4u, b1 = seed ^ 5u;
  for (long long i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kMmaChains; ++j) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      if constexpr (kBf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      }
#endif
    }
  }
  float s = 0;
#pragma unroll
  for (int j = 0; j < kMmaChains; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (s == 1234.5f) out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

__global__ void read_kernel(const float4* __restrict__ src, long long n4, float* out) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
  const long long stride = (long long)gridDim.x * blockDim.x;
#pragma unroll 4
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
    const float4 v = src[i];
    s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
  }
  const float t = s.x + s.y + s.z + s.w;
  if (t == 1234.5f) out[blockIdx.x * blockDim.x + threadIdx.x] = t;  // never true (buffer is zero)
}

__global__ void copy_kernel(const float4* __restrict__ src, float4* __restrict__ dst, long long n4) {
  const long long stride = (long long)gridDim.x * blockDim.x;
#pragma unroll 4
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) dst[i] = src[i];
}

struct DeviceBuf {
  void* p = nullptr;
  explicit DeviceBuf(size_t bytes, const char* what) { check(cudaMalloc(&p, bytes), what); }
  ~DeviceBuf() {
    if (p) cudaFree(p);
  }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

struct Events {
  cudaEvent_t a = nullptr, b = nullptr;
  Events() {
    check(cudaEventCreate(&a), "cudaEventCreate");
    check(cudaEventCreate(&b), "cudaEventCreate");
  }
  ~Events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  template <typename F>
  double time(F&& launch, const char* what) {
    check(cudaEventRecord(a), "cudaEventRecord");
    launch();
    check_launch(what);
    check(cudaEventRecord(b), "cudaEventRecord");
    check(cudaEventSynchronize(b), what);
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    return ms * 1e-3;
  }
};

bool have_device() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: not an error worth keeping
    return false;
  }
  return n > 0;
}

std::string device_name() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
  return p.name;
}

}  // namespace

std::vector<std::string> probe_compute_kinds() {
  if (!have_device()) return {};
  const DeviceInfo& d = device_info();
  std::vector<std::string> out = {"fma_fp32"};
  if (d.cc_major >= 8) {
    out.emplace_back("mma_bf16");
    out.emplace_back("mma_fp16");
  }
  return out;
}

std::vector<std::string> probe_memory_kinds() {
  if (!have_device()) return {};
  return {"read", "copy"};
}

CudaComputeProbe probe_compute(const std::string& kind, double seconds) {
  const auto kinds = probe_compute_kinds();
  if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end())
    throw std::invalid_argument("argument 'kind': CUDA compute probe '" + kind + "' is unknown or not runnable here");
  if (!(seconds > 0) || !std::isfinite(seconds)) throw std::invalid_argument("argument 'seconds' must be > 0");
  const DeviceInfo& d = device_info();
  CudaComputeProbe r;
  r.kind = kind;
  r.device_name = device_name();
  r.sm_count = d.sm_count;
  const bool fma = kind == "fma_fp32";
  r.threads_per_block = fma ? kFmaThreads : kMmaThreads;
  r.blocks = d.sm_count * (fma ? kFmaBlocksPerSm : kMmaBlocksPerSm);
  r.accumulators = fma ? kFmaChains : kMmaChains;
  r.instruction = fma ? "fma.rn.f32" : kind == "mma_bf16" ? "mma.sync.m16n8k16.f32.bf16" : "mma.sync.m16n8k16.f32.f16";
  // FLOP per loop iteration of the whole grid: FMA 2 per chain per thread; mma m16n8k16 2*16*8*16 per warp.
  const double flop_per_iter =
      fma ? 2.0 * kFmaChains * double(r.blocks) * r.threads_per_block
          : 2.0 * 16 * 8 * 16 * kMmaChains * double(r.blocks) * (r.threads_per_block / 32);
  DeviceBuf out(size_t(r.blocks) * r.threads_per_block * sizeof(float), "cudaMalloc (probe)");
  float* o = static_cast<float*>(out.p);
  Events ev;
  auto run = [&](long long iters) {
    return ev.time(
        [&] {
          if (fma)
            fma_fp32_kernel<<<r.blocks, r.threads_per_block>>>(iters, 0.0f, o);
          else if (kind == "mma_bf16")
            mma_kernel<true><<<r.blocks, r.threads_per_block>>>(iters, 0u, o);
          else
            mma_kernel<false><<<r.blocks, r.threads_per_block>>>(iters, 0u, o);
        },
        kind.c_str());
  };
  // Calibrate: grow until one launch takes >= 2 ms, then size a trial to seconds / kTrials (>= 1 ms).
  long long iters = 256;
  double t = run(iters);
  while (t < 2e-3 && iters < (1ll << 40)) {
    iters *= 4;
    t = run(iters);
  }
  iters = std::max(1ll, (long long)(iters * std::max(1e-3, seconds / kTrials) / t));
  r.iterations = iters;
  for (int i = 0; i < kTrials; ++i) r.trial_seconds.push_back(run(iters));
  for (double s : r.trial_seconds) r.seconds += s;
  const double best = *std::min_element(r.trial_seconds.begin(), r.trial_seconds.end());
  r.flops = flop_per_iter * double(iters) / best;
  return r;
}

CudaMemoryProbe probe_memory(const std::string& kind, int64_t nbytes, int reps) {
  const auto kinds = probe_memory_kinds();
  if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end())
    throw std::invalid_argument("argument 'kind': CUDA memory probe '" + kind + "' is unknown or not runnable here");
  if (reps < 1) throw std::invalid_argument("argument 'reps' must be >= 1");
  int dev = 0, l2 = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "cudaDeviceGetAttribute");
  if (nbytes <= 0) nbytes = std::max<int64_t>(int64_t(1) << 30, 4 * int64_t(l2));
  nbytes = nbytes / 64 * 64;
  const bool copy = kind == "copy";
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  if (nbytes < 4096 || double(nbytes) * (copy ? 2 : 1) > 0.9 * double(free_b))
    throw std::invalid_argument("argument 'nbytes' (" + std::to_string(nbytes) + ") must be >= 4096 and fit " +
                                std::string(copy ? "twice " : "") + "in the device's free memory (" +
                                std::to_string(free_b) + " bytes)");
  CudaMemoryProbe r;
  r.kind = kind;
  r.device_name = device_name();
  r.nbytes = nbytes;
  r.bytes_per_rep = double(nbytes) * (copy ? 2 : 1);
  DeviceBuf src(size_t(nbytes), "cudaMalloc (probe)");
  DeviceBuf dst(copy ? size_t(nbytes) : 64, "cudaMalloc (probe)");
  DeviceBuf out(size_t(device_info().sm_count) * 8 * 256 * sizeof(float), "cudaMalloc (probe)");
  check(cudaMemset(src.p, 0, size_t(nbytes)), "cudaMemset");
  const long long n4 = nbytes / 16;
  const int blocks = device_info().sm_count * 8, threads = 256;
  Events ev;
  for (int rep = -1; rep < reps; ++rep) {  // rep -1: warm-up
    const double t = ev.time(
        [&] {
          if (copy)
            copy_kernel<<<blocks, threads>>>(static_cast<const float4*>(src.p), static_cast<float4*>(dst.p), n4);
          else
            read_kernel<<<blocks, threads>>>(static_cast<const float4*>(src.p), n4, static_cast<float*>(out.p));
        },
        kind.c_str());
    if (rep >= 0) r.rep_seconds.push_back(t);
  }
  const double best = *std::min_element(r.rep_seconds.begin(), r.rep_seconds.end());
  r.gbs = r.bytes_per_rep / best / 1e9;
  return r;
}

}  // namespace pk::cuda
