// The only pybind11-aware file. It takes raw pointers (tensor.data_ptr()), sizes and a stream, checks
// everything it can check on its own (null pointers, sizes, overflow, index ranges of host-side
// metadata), fills the plain parameter structs of common/params.h and calls the kernels with the GIL
// released. It never links libtorch: pykernels/backends/native.py does the tensor side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/params.h"
#include "cpu/cpu.h"
#if defined(PK_WITH_CUDA)
#include "cuda/cuda.h"
#endif

namespace py = pybind11;
using pk::DType;

namespace {

constexpr int kCpu = 0;
constexpr int kCuda = 1;
// Largest byte count a single operand may have: far beyond any real buffer, small enough that
// pointer arithmetic on it cannot overflow.
constexpr int64_t kMaxBytes = int64_t(1) << 48;

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw py::value_error("pykernels._C." + fn + ": " + msg);
}

void check_ptr(const std::string& fn, const char* name, std::uintptr_t p) {
  if (p == 0) fail(fn, std::string("argument '") + name + "' is a null pointer");
}

void check_size(const std::string& fn, const char* name, int64_t v) {
  if (v < 1) fail(fn, std::string("argument '") + name + "' must be >= 1, got " + std::to_string(v));
}

// Product of the sizes of one operand, times the element size; fails if it overflows or passes kMaxBytes.
int64_t checked_bytes(const std::string& fn, const char* name, std::initializer_list<int64_t> dims,
                      int64_t elem) {
  int64_t n = elem;
  for (int64_t d : dims) {
    if (__builtin_mul_overflow(n, d, &n) || n > kMaxBytes)
      fail(fn, std::string("operand '") + name + "' is too large (its byte size overflows)");
  }
  return n;
}

DType check_dtype(const std::string& fn, int dtype) {
  if (dtype < 0 || dtype > 2)
    fail(fn, "argument 'dtype' must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  return static_cast<DType>(dtype);
}

void check_device(const std::string& fn, int device) {
  if (device != kCpu && device != kCuda)
    fail(fn, "argument 'device' must be 0 (cpu) or 1 (cuda), got " + std::to_string(device));
#if !defined(PK_WITH_CUDA)
  if (device == kCuda)
    throw py::type_error("pykernels._C." + fn +
                         ": pykernels was built without CUDA (no CUDA compiler at build time); "
                         "rebuild with PYKERNELS_CUDA=ON on a machine with nvcc");
#endif
}

#if defined(PK_WITH_CUDA)
void check_on_device(const std::string& fn, const char* name, std::uintptr_t p) {
  if (pk::cuda::pointer_device(reinterpret_cast<const void*>(p)) < 0)
    fail(fn, std::string("argument '") + name + "' is not CUDA device memory");
}
#endif

void check_scale(const std::string& fn, double scale) {
  if (!std::isfinite(scale) || scale == 0.0) fail(fn, "argument 'scale' must be finite and non-zero");
}

void gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int64_t M, int64_t N, int64_t K, int dtype,
          int device, std::uintptr_t stream, bool transb) {
  const std::string fn = "gemm";
  check_ptr(fn, "a", a);
  check_ptr(fn, "b", b);
  check_ptr(fn, "c", c);
  check_size(fn, "M", M);
  check_size(fn, "N", N);
  check_size(fn, "K", K);
  const DType dt = check_dtype(fn, dtype);
  check_device(fn, device);
  const int64_t es = pk::dtype_size(dt);
  checked_bytes(fn, "a", {M, K}, es);
  if (transb) {
    checked_bytes(fn, "b", {N, K}, es);
  } else {
    checked_bytes(fn, "b", {K, N}, es);
  }
  checked_bytes(fn, "c", {M, N}, es);
  pk::GemmParams p{reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                   reinterpret_cast<void*>(c), M, N, K, dt, transb};
  if (device == kCpu) {
    py::gil_scoped_release nogil;
    pk::cpu::gemm(p);
    return;
  }
  if (transb) fail(fn, "argument 'transb': B stored [N, K] is implemented on the CPU only");
#if defined(PK_WITH_CUDA)
  check_on_device(fn, "a", a);
  check_on_device(fn, "b", b);
  check_on_device(fn, "c", c);
  py::gil_scoped_release nogil;
  pk::cuda::gemm(p, stream);
#endif
}

void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t S, int64_t D, double scale, bool causal, int dtype, int device,
               std::uintptr_t stream) {
  const std::string fn = "attention";
  check_ptr(fn, "q", q);
  check_ptr(fn, "k", k);
  check_ptr(fn, "v", v);
  check_ptr(fn, "o", o);
  check_size(fn, "B", B);
  check_size(fn, "Hq", Hq);
  check_size(fn, "Hkv", Hkv);
  check_size(fn, "S", S);
  check_size(fn, "D", D);
  if (Hq % Hkv != 0)
    fail(fn, "argument 'Hq' (" + std::to_string(Hq) + ") must be a multiple of 'Hkv' (" + std::to_string(Hkv) + ")");
  check_scale(fn, scale);
  const DType dt = check_dtype(fn, dtype);
  check_device(fn, device);
  const int64_t es = pk::dtype_size(dt);
  checked_bytes(fn, "q", {B, Hq, S, D}, es);
  checked_bytes(fn, "k", {B, Hkv, S, D}, es);
  pk::AttentionParams p{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k),
                        reinterpret_cast<const void*>(v), reinterpret_cast<void*>(o), B, Hq, Hkv, S, D,
                        static_cast<float>(scale), causal, dt};
  if (device == kCpu) {
    py::gil_scoped_release nogil;
    pk::cpu::attention(p);
    return;
  }
#if defined(PK_WITH_CUDA)
  for (auto [name, ptr] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"o", o}}) check_on_device(fn, name, ptr);
  py::gil_scoped_release nogil;
  pk::cuda::attention(p, stream);
#endif
}

void decode(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t o,
            std::uintptr_t context_lens, std::uintptr_t block_table, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
            int64_t num_blocks, int64_t block_size, int64_t max_blocks, double scale, int dtype, int device,
            std::uintptr_t stream) {
  const std::string fn = "decode";
  check_ptr(fn, "q", q);
  check_ptr(fn, "k_cache", k_cache);
  check_ptr(fn, "v_cache", v_cache);
  check_ptr(fn, "o", o);
  check_ptr(fn, "context_lens", context_lens);
  check_size(fn, "B", B);
  check_size(fn, "Hq", Hq);
  check_size(fn, "Hkv", Hkv);
  check_size(fn, "D", D);
  check_size(fn, "num_blocks", num_blocks);
  check_size(fn, "block_size", block_size);
  check_size(fn, "max_blocks", max_blocks);
  if (Hq % Hkv != 0)
    fail(fn, "argument 'Hq' (" + std::to_string(Hq) + ") must be a multiple of 'Hkv' (" + std::to_string(Hkv) + ")");
  const bool paged = block_table != 0;
  if (!paged && (num_blocks != B || max_blocks != 1))
    fail(fn, "a contiguous cache (block_table == 0) needs num_blocks == B and max_blocks == 1");
  check_scale(fn, scale);
  const DType dt = check_dtype(fn, dtype);
  check_device(fn, device);
  const int64_t es = pk::dtype_size(dt);
  checked_bytes(fn, "q", {B, Hq, D}, es);
  checked_bytes(fn, "k_cache", {num_blocks, Hkv, block_size, D}, es);
  const int64_t capacity = checked_bytes(fn, "block_table", {max_blocks, block_size}, 1);
  checked_bytes(fn, "block_table", {B, max_blocks}, 4);
  pk::DecodeParams p{reinterpret_cast<const void*>(q),
                     reinterpret_cast<const void*>(k_cache),
                     reinterpret_cast<const void*>(v_cache),
                     reinterpret_cast<void*>(o),
                     reinterpret_cast<const int32_t*>(context_lens),
                     paged ? reinterpret_cast<const int32_t*>(block_table) : nullptr,
                     B, Hq, Hkv, D, num_blocks, block_size, max_blocks, static_cast<float>(scale), dt};
  if (device == kCpu) {
    // Host-side metadata can be checked here, so a bad index never reaches a kernel.
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = p.context_lens[b];
      if (len < 1 || len > capacity)
        fail(fn, "context_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside 1.." +
                     std::to_string(capacity));
      if (paged) {
        for (int64_t j = 0; j < (len + block_size - 1) / block_size; ++j) {
          const int64_t blk = p.block_table[b * max_blocks + j];
          if (blk < 0 || blk >= num_blocks)
            fail(fn, "block_table[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(blk) +
                         " is outside 0.." + std::to_string(num_blocks - 1));
        }
      }
    }
    py::gil_scoped_release nogil;
    pk::cpu::decode(p);
    return;
  }
#if defined(PK_WITH_CUDA)
  for (auto [name, ptr] : {std::pair{"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache}, {"o", o},
                           {"context_lens", context_lens}})
    check_on_device(fn, name, ptr);
  if (paged) check_on_device(fn, "block_table", block_table);
  py::gil_scoped_release nogil;
  pk::cuda::decode(p, stream);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels native kernels (private; use the pykernels package API)";
  m.def("gemm", &gemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("dtype"), py::arg("device") = kCpu, py::arg("stream") = 0, py::arg("transb") = false);
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("S"), py::arg("D"), py::arg("scale"), py::arg("causal"),
        py::arg("dtype"), py::arg("device") = kCpu, py::arg("stream") = 0);
  m.def("decode", &decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("o"),
        py::arg("context_lens"), py::arg("block_table"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("D"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("scale"),
        py::arg("dtype"), py::arg("device") = kCpu, py::arg("stream") = 0);
  m.def("cpu_features", []() {
    const auto& f = pk::cpu::features();
    py::dict d;
    d["avx2_fma"] = f.avx2_fma;
    d["avx512f"] = f.avx512f;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx_bf16"] = f.amx_bf16;
    return d;
  });
  m.def("build_info", []() {
    py::dict d;
#if defined(PK_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_runtime"] = pk::cuda::runtime_info();
#else
    d["cuda"] = false;
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
#if defined(__AVX512F__)
    d["compiled_avx512"] = true;
#else
    d["compiled_avx512"] = false;
#endif
    d["omp_max_threads"] = pk::cpu::max_threads();
    return d;
  });
#if defined(PK_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
