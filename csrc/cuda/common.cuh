// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): error checks, element types, device
// properties, stream-ordered scratch memory and thin wrappers of the PTX instructions the kernels
// use (cp.async, ldmatrix, mma.sync). No pybind11, no torch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/params.h"

namespace pk::cuda {

// ---- host side ----------------------------------------------------------------------------------

// Throws std::runtime_error naming `what` (a kernel or a runtime call) if `e` is an error. A sticky
// error (an earlier kernel faulted) shows up here too, with the name of the first call that sees it.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("pykernels CUDA: ") + what + " failed: " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

// After a launch: configuration errors (too much shared memory, bad grid) come back from
// cudaGetLastError; they are not sticky, so reading the error clears it.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

struct DeviceInfo {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
  int max_smem_optin = 0;  // bytes of shared memory a block may opt into
};

// Properties of the current device, read once per device (cudaDeviceGetAttribute is cheap, but it is
// called on every kernel launch otherwise). Defined in runtime.cu.
const DeviceInfo& device_info();

// Stream-ordered scratch buffer: cudaMallocAsync on the stream, cudaFreeAsync on the same stream when
// the owner goes out of scope (after the kernels that use it were enqueued). Both are legal while a
// stream is being captured into a CUDA graph (they become memory nodes), so timing through graphs works.
class Scratch {
 public:
  Scratch(std::size_t bytes, cudaStream_t stream, const char* what) : stream_(stream) {
    if (bytes > 0) check(cudaMallocAsync(&ptr_, bytes, stream), what);
  }
  ~Scratch() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);  // no throw from a destructor; an error here stays sticky
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}) with T = __half or __nv_bfloat16 for the dtype; anything else is refused with the
// message the Python side turns into a clear error.
template <typename F>
void dispatch_half_types(DType dt, const char* family, F&& f) {
  switch (dt) {
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    default:
      throw std::invalid_argument(std::string("pykernels CUDA ") + family + ": dtype " + dtype_name(dt) +
                                  " is not supported on CUDA (float16 and bfloat16 are)");
  }
}

// Raises the dynamic shared-memory limit of a kernel (needed above 48 KB) on the current device, once
// per (kernel, device). Defined in runtime.cu.
void ensure_smem(const void* kernel, int bytes, const char* name);
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, const char* name) {
  ensure_smem(reinterpret_cast<const void*>(kernel), bytes, name);
}

// ---- device side --------------------------------------------------------------------------------

template <typename T>
struct Pack2;  // two elements packed in 32 bits
template <>
struct Pack2<__half> {
  using type = __half2;
};
template <>
struct Pack2<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats -> one 32-bit register holding two T (low half = a), as mma.sync operands want them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 32-bit register with two T -> two floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared. src_bytes < 16 zero-fills the rest (0: all zeros, and
// the source is not read, though its address must still be a valid one).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A(16x16, row) . B(16x8, col) + D, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory tiles of 16-byte chunks, `kChunks` chunks per row, XOR-swizzled so that the 8 rows
// one ldmatrix phase reads (8 consecutive rows, same logical chunk) fall in 8 different 16-byte bank
// groups: a 128-byte bank line holds 8 chunks, so with kChunks >= 8 the chunk index is XORed with
// row % 8; with fewer chunks per row, 8 / kChunks rows share a line and the XOR uses the line index.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(kChunks == 2 || kChunks == 4 || kChunks == 8 || kChunks == 16 || kChunks == 32,
                "rows of 2..32 chunks of 16 bytes");
  if constexpr (kChunks >= 8) {
    return row * kChunks + (chunk ^ (row & 7));
  } else {
    constexpr int kRowsPerLine = 8 / kChunks;
    return row * kChunks + (chunk ^ ((row / kRowsPerLine) & (kChunks - 1)));
  }
}

// Streaming 16-byte load of data read exactly once (KV cache): skip L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

}  // namespace pk::cuda
