// The only pybind11-aware file. It takes raw pointers (tensor.data_ptr()), sizes and a stream, checks
// everything it can check on its own (null pointers, sizes, overflow, index ranges of host-side
// metadata), fills the plain parameter structs of common/params.h and calls the kernels with the GIL
// released. It never links libtorch: pykernels/backends/native.py does the tensor side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <limits>
#include <memory>
#include <stdexcept>
#include <functional>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/params.h"
#include "cpu/cpu.h"
#include "cpu/probes.h"
#if defined(PK_WITH_CUDA)
#include "cuda/cuda.h"
#include "cuda/probes.h"
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

// Evicts [p, p + nbytes) from every cache level (clflush per 64-byte line), for cold-cache timing of one
// operand without flushing anything else (code, other data). False where the ISA has no such instruction.
bool evict_cpu(std::uintptr_t p, int64_t nbytes) {
  check_ptr("evict_cpu", "ptr", p);
  if (nbytes < 0 || nbytes > kMaxBytes)
    fail("evict_cpu", "argument 'nbytes' must be in 0 .. 2^48, got " + std::to_string(nbytes));
#if defined(__x86_64__) || defined(_M_X64)
  const std::uintptr_t end = p + static_cast<std::uintptr_t>(nbytes);
  for (std::uintptr_t a = p & ~std::uintptr_t(63); a < end; a += 64) _mm_clflush(reinterpret_cast<const void*>(a));
  _mm_mfence();
  return true;
#else
  return false;
#endif
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

// Releasing the GIL costs two thread-state swaps per call; it pays only when the kernel runs long enough
// for another Python thread to use the time. Below ~1 MFLOP (~5-20 us on one core) or 256 KiB read, a CPU
// kernel keeps the GIL, so a 16^3 GEMM does not pay for a release it cannot use.
constexpr double kReleaseGilFlops = 1.0e6;
constexpr double kReleaseGilBytes = 256.0 * 1024;

template <class F> void run_cpu(bool release_gil, const F& kernel) {
  if (release_gil) {
    py::gil_scoped_release nogil;
    kernel();
  } else {
    kernel();
  }
}

pk::GemmParams gemm_params(const std::string& fn, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int64_t M,
                           int64_t N, int64_t K, int dtype, int device, bool transb = false) {
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
  return pk::GemmParams{reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                        reinterpret_cast<void*>(c), M, N, K, dt, transb};
}

bool gemm_release_gil(const pk::GemmParams& p) { return 2.0 * p.M * p.N * p.K >= kReleaseGilFlops; }

void gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int64_t M, int64_t N, int64_t K, int dtype,
          int device, std::uintptr_t stream, bool transb) {
  const std::string fn = "gemm";
  const pk::GemmParams p = gemm_params(fn, a, b, c, M, N, K, dtype, device, transb);
  if (device == kCpu) return run_cpu(gemm_release_gil(p), [&] { pk::cpu::gemm(p); });
  if (transb) fail(fn, "argument 'transb': B stored [N, K] is implemented on the CPU only");
#if defined(PK_WITH_CUDA)
  check_on_device(fn, "a", a);
  check_on_device(fn, "b", b);
  check_on_device(fn, "c", c);
  py::gil_scoped_release nogil;
  pk::cuda::gemm(p, stream);
#endif
}

pk::AttentionParams attention_params(const std::string& fn, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                                     std::uintptr_t o, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
                                     double scale, bool causal, int dtype, int device) {
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
  return pk::AttentionParams{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k),
                             reinterpret_cast<const void*>(v), reinterpret_cast<void*>(o), B, Hq, Hkv, S, D,
                             static_cast<float>(scale), causal, dt};
}

bool attention_release_gil(const pk::AttentionParams& p) {
  return 4.0 * p.B * p.Hq * p.S * p.S * p.D >= kReleaseGilFlops;
}

void attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t S, int64_t D, double scale, bool causal, int dtype, int device,
               std::uintptr_t stream) {
  const std::string fn = "attention";
  const pk::AttentionParams p = attention_params(fn, q, k, v, o, B, Hq, Hkv, S, D, scale, causal, dtype, device);
  if (device == kCpu) return run_cpu(attention_release_gil(p), [&] { pk::cpu::attention(p); });
#if defined(PK_WITH_CUDA)
  for (auto [name, ptr] : {std::pair{"q", q}, {"k", k}, {"v", v}, {"o", o}}) check_on_device(fn, name, ptr);
  py::gil_scoped_release nogil;
  pk::cuda::attention(p, stream);
#endif
}

pk::DecodeParams decode_params(const std::string& fn, std::uintptr_t q, std::uintptr_t k_cache,
                               std::uintptr_t v_cache, std::uintptr_t o, std::uintptr_t context_lens,
                               std::uintptr_t block_table, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                               int64_t num_blocks, int64_t block_size, int64_t max_blocks, double scale, int dtype,
                               int device) {
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
  checked_bytes(fn, "block_table", {max_blocks, block_size}, 1);
  checked_bytes(fn, "block_table", {B, max_blocks}, 4);
  return pk::DecodeParams{reinterpret_cast<const void*>(q),
                          reinterpret_cast<const void*>(k_cache),
                          reinterpret_cast<const void*>(v_cache),
                          reinterpret_cast<void*>(o),
                          reinterpret_cast<const int32_t*>(context_lens),
                          paged ? reinterpret_cast<const int32_t*>(block_table) : nullptr,
                          B, Hq, Hkv, D, num_blocks, block_size, max_blocks, static_cast<float>(scale), dt};
}

// Host-side metadata (CPU only) is checked on every call, so a bad index never reaches a kernel, not even
// one written into context_lens or block_table after a call was prepared. Returns the K/V bytes the call
// reads (both caches), for the GIL policy.
double check_decode_metadata(const std::string& fn, const pk::DecodeParams& p) {
  const int64_t capacity = p.max_blocks * p.block_size;  // checked against overflow in decode_params
  int64_t tokens = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t len = p.context_lens[b];
    if (len < 1 || len > capacity)
      fail(fn, "context_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside 1.." +
                   std::to_string(capacity));
    tokens += len;
    if (p.block_table) {
      for (int64_t j = 0; j < (len + p.block_size - 1) / p.block_size; ++j) {
        const int64_t blk = p.block_table[b * p.max_blocks + j];
        if (blk < 0 || blk >= p.num_blocks)
          fail(fn, "block_table[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(blk) +
                       " is outside 0.." + std::to_string(p.num_blocks - 1));
      }
    }
  }
  return 2.0 * double(tokens) * double(p.Hkv) * double(p.D) * double(pk::dtype_size(p.dtype));
}

void decode(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t o,
            std::uintptr_t context_lens, std::uintptr_t block_table, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
            int64_t num_blocks, int64_t block_size, int64_t max_blocks, double scale, int dtype, int device,
            std::uintptr_t stream) {
  const std::string fn = "decode";
  const pk::DecodeParams p = decode_params(fn, q, k_cache, v_cache, o, context_lens, block_table, B, Hq, Hkv, D,
                                           num_blocks, block_size, max_blocks, scale, dtype, device);
  if (device == kCpu) {
    const double bytes = check_decode_metadata(fn, p);
    return run_cpu(bytes >= kReleaseGilBytes, [&] { pk::cpu::decode(p); });
  }
#if defined(PK_WITH_CUDA)
  for (auto [name, ptr] : {std::pair{"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache}, {"o", o},
                           {"context_lens", context_lens}})
    check_on_device(fn, name, ptr);
  if (block_table) check_on_device(fn, "block_table", block_table);
  py::gil_scoped_release nogil;
  pk::cuda::decode(p, stream);
#endif
}

// ---- hardware peak probes (csrc/cpu/probes.h, csrc/cuda/probes.h) -------------------------------------
constexpr int kMaxProbeThreads = 1024;
constexpr double kMaxProbeSeconds = 60.0;
constexpr int kMaxProbeReps = 1000;

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "none" : s;
}

void check_kind(const std::string& fn, const std::string& kind, const std::vector<std::string>& here,
                const std::vector<std::string>& known) {
  for (const auto& k : here)
    if (k == kind) return;
  for (const auto& k : known)
    if (k == kind)
      fail(fn, "argument 'kind': '" + kind + "' does not run on this machine (runnable here: " + join(here) + ")");
  fail(fn, "argument 'kind' must be one of " + join(known) + ", got '" + kind + "'");
}

// An int argument (past 64 bits: saturated); TypeError naming it when it is not an int (None is not either).
int64_t int_arg(const std::string& fn, const char* name, const py::object& v, bool or_none = false) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr()))
    throw py::type_error("pykernels._C." + fn + ": argument '" + name + "' must be an int" + (or_none ? " or None" : "") +
                         ", got " + std::string(Py_TYPE(v.ptr())->tp_name));
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow) return overflow > 0 ? std::numeric_limits<int64_t>::max() : std::numeric_limits<int64_t>::min();
  return x;
}

// An optional int argument (None -> `none`); TypeError naming it when it is not an int.
int64_t opt_int(const std::string& fn, const char* name, const py::object& v, int64_t none) {
  return v.is_none() ? none : int_arg(fn, name, v, true);
}

int check_threads(const std::string& fn, const py::object& threads) {
  if (threads.is_none()) return 0;
  const int64_t t = opt_int(fn, "threads", threads, 0);
  if (t < 1 || t > kMaxProbeThreads)
    fail(fn, "argument 'threads' must be None or 1.." + std::to_string(kMaxProbeThreads) + ", got " + std::to_string(t));
  return int(t);
}

void check_seconds(const std::string& fn, double seconds) {
  if (!std::isfinite(seconds) || seconds <= 0 || seconds > kMaxProbeSeconds)
    fail(fn, "argument 'seconds' must be in (0, " + std::to_string(int(kMaxProbeSeconds)) + "], got " +
                 std::to_string(seconds));
}

void check_reps(const std::string& fn, int64_t reps) {
  if (reps < 1 || reps > kMaxProbeReps)
    fail(fn, "argument 'reps' must be 1.." + std::to_string(kMaxProbeReps) + ", got " + std::to_string(reps));
}

py::dict probe_kinds() {
  py::dict d;
  d["compute"] = pk::cpu::probe_compute_kinds();
  d["memory"] = pk::cpu::probe_memory_kinds();
#if defined(__x86_64__) || defined(__aarch64__)
  d["clock"] = true;
#else
  d["clock"] = false;  // no asm add chain for this ISA
#endif
  std::vector<std::string> cc, cm;
#if defined(PK_WITH_CUDA)
  try {
    cc = pk::cuda::probe_compute_kinds();
    cm = pk::cuda::probe_memory_kinds();
  } catch (const std::exception&) {  // a broken driver means no CUDA probes, not a failed call
    cc.clear();
    cm.clear();
  }
#endif
  d["cuda_compute"] = cc;
  d["cuda_memory"] = cm;
  return d;
}

py::dict probe_compute(const std::string& kind, const py::object& threads, double seconds) {
  const std::string fn = "probe_compute";
  check_kind(fn, kind, pk::cpu::probe_compute_kinds(), pk::cpu::probe_compute_known());
  const int t = check_threads(fn, threads);
  check_seconds(fn, seconds);
  pk::cpu::ComputeProbe r;
  {
    py::gil_scoped_release nogil;
    r = pk::cpu::probe_compute(kind, t, seconds);
  }
  py::dict d;
  d["kind"] = r.kind;
  d["flops"] = r.flops;
  d["flops_cpu_time"] = r.flops_cpu_time;
  d["instruction"] = r.instruction;
  d["threads"] = r.threads;
  d["accumulators"] = r.accumulators;
  d["flop_per_instruction"] = r.flop_per_instruction;
  d["seconds"] = r.seconds;
  d["iterations"] = r.iterations;
  d["trial_seconds"] = r.trial_seconds;
  return d;
}

py::dict probe_memory(const std::string& kind, const py::object& nbytes, const py::object& threads, int64_t reps) {
  const std::string fn = "probe_memory";
  check_kind(fn, kind, pk::cpu::probe_memory_kinds(), pk::cpu::probe_memory_kinds());
  int64_t nb = 0;
  if (!nbytes.is_none()) {
    nb = opt_int(fn, "nbytes", nbytes, 0);
    const int arrays = kind == "read" ? 1 : kind == "triad" ? 3 : 2;
    const int64_t phys = pk::cpu::physical_memory_bytes();
    // Half the physical memory for all arrays together: more would swap or get the process killed.
    if (nb < 4096 || (phys > 0 && nb > phys / 2 / arrays) || (phys <= 0 && nb > kMaxBytes))
      fail(fn, "argument 'nbytes' must be None or 4096.." + std::to_string(phys > 0 ? phys / 2 / arrays : kMaxBytes) +
                   " (bytes per array; " + std::to_string(arrays) + " arrays for '" + kind +
                   "' within half the physical memory), got " + std::to_string(nb));
  }
  const int t = check_threads(fn, threads);
  check_reps(fn, reps);
  pk::cpu::MemoryProbe r;
  {
    py::gil_scoped_release nogil;
    r = pk::cpu::probe_memory(kind, nb, t, int(reps));
  }
  py::dict d;
  d["kind"] = r.kind;
  d["gbs"] = r.gbs;
  d["nbytes"] = r.nbytes;
  d["arrays"] = r.arrays;
  d["bytes_per_rep"] = r.bytes_per_rep;
  d["threads"] = r.threads;
  d["rep_seconds"] = r.rep_seconds;
  d["store"] = r.store;
  return d;
}

// The read probe over an array kept between calls (pk::cpu::ReadPass), checked as probe_memory checks.
std::unique_ptr<pk::cpu::ReadPass> make_read_pass(const py::object& nbytes, const py::object& threads) {
  const std::string fn = "ReadPass";
  int64_t nb = 0;
  if (!nbytes.is_none()) {
    nb = opt_int(fn, "nbytes", nbytes, 0);
    const int64_t phys = pk::cpu::physical_memory_bytes();
    const int64_t most = phys > 0 ? phys / 2 : kMaxBytes;
    if (nb < 4096 || nb > most)
      fail(fn, "argument 'nbytes' must be None or 4096.." + std::to_string(most) + " (within half the physical "
               "memory), got " + std::to_string(nb));
  }
  const int t = check_threads(fn, threads);
  py::gil_scoped_release nogil;
  return std::make_unique<pk::cpu::ReadPass>(nb, t);
}

// A compute probe's loop with fixed work (pk::cpu::ComputePass), checked as probe_compute checks.
std::unique_ptr<pk::cpu::ComputePass> make_compute_pass(const std::string& kind, const py::object& threads,
                                                        double seconds) {
  const std::string fn = "ComputePass";
  check_kind(fn, kind, pk::cpu::probe_compute_kinds(), pk::cpu::probe_compute_known());
  const int t = check_threads(fn, threads);
  check_seconds(fn, seconds);
  py::gil_scoped_release nogil;
  return std::make_unique<pk::cpu::ComputePass>(kind, t, seconds);
}

py::dict probe_clock(const py::object& threads) {
  const int t = check_threads("probe_clock", threads);
  pk::cpu::ClockProbe r;
  {
    py::gil_scoped_release nogil;
    r = pk::cpu::probe_clock(t);
  }
  py::dict d;
  d["ghz"] = r.ghz;
  d["ghz_wall"] = r.ghz_wall;
  d["ghz_min"] = r.ghz_min;
  d["ghz_max"] = r.ghz_max;
  d["per_thread_ghz"] = r.per_thread_ghz;
  d["threads"] = r.threads;
  d["chain"] = r.chain;
  d["method"] = "dependent add chain (1 cycle per add), best of 10 trials per thread by thread CPU time "
                "(steady_clock figure in ghz_wall)";
  return d;
}

#if !defined(PK_WITH_CUDA)
[[noreturn]] void no_cuda(const std::string& fn) {
  throw std::runtime_error("pykernels._C." + fn +
                           ": pykernels was built without CUDA (no CUDA compiler at build time); "
                           "rebuild with PYKERNELS_CUDA=ON on a machine with nvcc");
}
#endif

py::dict probe_cuda_compute(const std::string& kind, double seconds) {
  const std::string fn = "probe_cuda_compute";
#if defined(PK_WITH_CUDA)
  check_kind(fn, kind, pk::cuda::probe_compute_kinds(), {"fma_fp32", "mma_bf16", "mma_fp16"});
  check_seconds(fn, seconds);
  pk::cuda::CudaComputeProbe r;
  {
    py::gil_scoped_release nogil;
    r = pk::cuda::probe_compute(kind, seconds);
  }
  py::dict d;
  d["kind"] = r.kind;
  d["flops"] = r.flops;
  d["instruction"] = r.instruction;
  d["device"] = r.device_name;
  d["blocks"] = r.blocks;
  d["threads_per_block"] = r.threads_per_block;
  d["accumulators"] = r.accumulators;
  d["sm_count"] = r.sm_count;
  d["iterations"] = r.iterations;
  d["seconds"] = r.seconds;
  d["trial_seconds"] = r.trial_seconds;
  d["verified"] = false;  // unverified on a GPU (see csrc/cuda/probes.cu)
  return d;
#else
  no_cuda(fn);
#endif
}

py::dict probe_cuda_memory(const std::string& kind, const py::object& nbytes, int64_t reps) {
  const std::string fn = "probe_cuda_memory";
#if defined(PK_WITH_CUDA)
  check_kind(fn, kind, pk::cuda::probe_memory_kinds(), {"read", "copy"});
  int64_t nb = 0;
  if (!nbytes.is_none()) {
    nb = opt_int(fn, "nbytes", nbytes, 0);
    if (nb < 4096 || nb > kMaxBytes)
      fail(fn, "argument 'nbytes' must be None or >= 4096 (and fit the device), got " + std::to_string(nb));
  }
  check_reps(fn, reps);
  pk::cuda::CudaMemoryProbe r;
  {
    py::gil_scoped_release nogil;
    r = pk::cuda::probe_memory(kind, nb, int(reps));
  }
  py::dict d;
  d["kind"] = r.kind;
  d["gbs"] = r.gbs;
  d["nbytes"] = r.nbytes;
  d["bytes_per_rep"] = r.bytes_per_rep;
  d["device"] = r.device_name;
  d["rep_seconds"] = r.rep_seconds;
  d["verified"] = false;
  return d;
#else
  no_cuda(fn);
#endif
}

// ---- prepared CPU calls (pk.prepare of the native backend) ------------------------------------------
// Everything above is checked once, when the call is prepared; the returned zero-argument function is one
// pybind11 dispatch without arguments to convert, the kernel (and decode's metadata check), and returns
// the output tensor allocated at prepare time. `keep` holds the operand tensors, so the pointers stay
// valid as long as the function lives. Measured on the loaded 2-core Zen 5 VM (tools/issue6.py
// --overhead): the per-call cost of the binding with 9 integer arguments was ~0.5-1 us of a 16^3 GEMM.
py::cpp_function prepared(std::function<void()> kernel, bool release_gil, py::object out, py::object keep) {
  return py::cpp_function([kernel = std::move(kernel), release_gil, out = std::move(out), keep = std::move(keep)]() {
    run_cpu(release_gil, kernel);
    return out;
  });
}

py::cpp_function prepare_gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int64_t M, int64_t N, int64_t K,
                              int dtype, py::object out, py::object keep, bool transb) {
  const pk::GemmParams p = gemm_params("prepare_gemm", a, b, c, M, N, K, dtype, kCpu, transb);
  return prepared([p] { pk::cpu::gemm(p); }, gemm_release_gil(p), std::move(out), std::move(keep));
}

py::cpp_function prepare_attention(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                                   int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, double scale,
                                   bool causal, int dtype, py::object out, py::object keep) {
  const pk::AttentionParams p =
      attention_params("prepare_attention", q, k, v, o, B, Hq, Hkv, S, D, scale, causal, dtype, kCpu);
  return prepared([p] { pk::cpu::attention(p); }, attention_release_gil(p), std::move(out), std::move(keep));
}

py::cpp_function prepare_decode(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t o,
                                std::uintptr_t context_lens, std::uintptr_t block_table, int64_t B, int64_t Hq,
                                int64_t Hkv, int64_t D, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                double scale, int dtype, py::object out, py::object keep) {
  const std::string fn = "decode";
  const pk::DecodeParams p = decode_params(fn, q, k_cache, v_cache, o, context_lens, block_table, B, Hq, Hkv, D,
                                           num_blocks, block_size, max_blocks, scale, dtype, kCpu);
  check_decode_metadata(fn, p);  // now too: a prepare with bad metadata fails at once
  // The metadata is read again on every call (it is host memory the caller may change); the GIL policy
  // follows the bytes of that call.
  return py::cpp_function([p, out = std::move(out), keep = std::move(keep)]() {
    const double bytes = check_decode_metadata("decode", p);
    run_cpu(bytes >= kReleaseGilBytes, [&] { pk::cpu::decode(p); });
    return out;
  });
}

// The tier names, best first: all of them, or those this CPU runs.
std::string isa_names(bool supported_only) {
  std::string out;
  for (auto u : pk::cpu::kIsas)
    if (!supported_only || pk::cpu::isa_supported(u)) out += std::string(out.empty() ? "" : ", ") + pk::cpu::isa_name(u);
  return out;
}

// Selects an ISA tier by name; ValueError naming `what` (the argument or the environment variable).
void set_cpu_isa_checked(const char* what, const std::string& name) {
  pk::cpu::Isa t;
  if (!pk::cpu::parse_isa(name.c_str(), &t))
    throw py::value_error(std::string(what) + ": unknown CPU ISA tier '" + name + "' (known: " + isa_names(false) + ")");
  if (!pk::cpu::isa_supported(t))
    throw py::value_error(std::string(what) + ": this CPU cannot run the '" + name + "' tier (it runs: " +
                          isa_names(true) + ")");
  pk::cpu::set_isa(t);
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
  // Prepared CPU calls: the same arguments without device and stream, plus the output tensor the call
  // returns and the operands it keeps alive.
  m.def("prepare_gemm", &prepare_gemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("dtype"), py::arg("out"), py::arg("keep"), py::arg("transb") = false);
  m.def("prepare_attention", &prepare_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
        py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("S"), py::arg("D"), py::arg("scale"),
        py::arg("causal"), py::arg("dtype"), py::arg("out"), py::arg("keep"));
  m.def("prepare_decode", &prepare_decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("o"),
        py::arg("context_lens"), py::arg("block_table"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("D"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("scale"),
        py::arg("dtype"), py::arg("out"), py::arg("keep"));
  m.def("cpu_features", []() {
    const auto& f = pk::cpu::features();
    py::dict d;
    d["avx2_fma"] = f.avx2_fma;
    d["neon"] = f.neon;
    d["avx512f"] = f.avx512f;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx_bf16"] = f.amx_bf16;
    // the compute-bound bf16 paths of the avx512 tier use vdpbf16ps only where it beats widening to fp32
    // (cpu.h bf16_dot_pays)
    d["bf16_dot_used"] = pk::cpu::bf16_dot_pays();
    d["bf16_dot_source"] = std::string(pk::cpu::bf16_dot_source());
    d["zmm_fma_full_width"] = pk::cpu::zmm_fma_full_width();
    d["zmm_fma_source"] = std::string(pk::cpu::zmm_fma_source());
    // where the decode kernels' software prefetches of the K/V streams land (cpu.h stream_prefetch)
    d["stream_prefetch"] = std::string(pk::cpu::stream_prefetch_name(pk::cpu::stream_prefetch()));
    d["stream_prefetch_source"] = pk::cpu::stream_prefetch_source();
    d["stream_prefetch_near"] = pk::cpu::stream_prefetch_near();
    d["stream_prefetch_near_source"] = pk::cpu::stream_prefetch_near_source();
    d["stream_prefetch_distance"] = pk::cpu::stream_prefetch_distance();
    d["stream_prefetch_distance_source"] = pk::cpu::stream_prefetch_distance_source();
    // rows of B per step of a GEMV-like product (M = 1, B [K, N]: cpu.h gemv_streams)
    d["gemv_streams"] = pk::cpu::gemv_streams();
    d["gemv_streams_source"] = pk::cpu::gemv_streams_source();
    // tokens per step of one kv head of the AVX-512 decode on a paged cache (cpu.h paged_step)
    d["paged_step"] = pk::cpu::paged_step();
    d["paged_step_source"] = pk::cpu::paged_step_source();
    return d;
  });
  // ISA tiers (csrc/cpu/cpu.h). PYKERNELS_CPU_ISA=amx|avx512|avx2|neon|portable, read here once, picks the tier
  // for the process; an unknown or unsupported name makes the import fail (pybind11 turns the ValueError
  // raised in module init into an ImportError with the same message; backend native then reports it).
  m.def("evict_cpu", &evict_cpu, py::arg("ptr"), py::arg("nbytes"));
  m.def("cpu_isa", []() { return std::string(pk::cpu::isa_name(pk::cpu::active_isa())); });
  m.def("decode_cpu_isa", [](int64_t D) { return std::string(pk::cpu::isa_name(pk::cpu::decode_isa(D))); },
        py::arg("D"));
  m.def(
      "attention_cpu_isa",
      [](int64_t D, int dtype) {
        return std::string(pk::cpu::isa_name(pk::cpu::attention_isa(D, check_dtype("attention_cpu_isa", dtype))));
      },
      py::arg("D"), py::arg("dtype"));
  m.def("cpu_isas", []() {
    py::list l;
    for (auto t : pk::cpu::kIsas)
      if (pk::cpu::isa_supported(t)) l.append(pk::cpu::isa_name(t));
    return l;
  });
  m.def("set_cpu_isa", [](const std::string& name) { set_cpu_isa_checked("name", name); }, py::arg("name"));
  m.def("cpu_caches", []() {
    const auto& c = pk::cpu::caches();
    py::dict d;
    d["l1d"] = c.l1d;
    d["l2"] = c.l2;
    d["l3"] = c.l3;
    d["l3_sharing"] = c.l3_sharing;
    return d;
  });
  if (const char* env = std::getenv("PYKERNELS_CPU_ISA"); env && *env) set_cpu_isa_checked("PYKERNELS_CPU_ISA", env);
  // PYKERNELS_BF16_DOT=on|off|auto: a bad value fails the import, as PYKERNELS_CPU_ISA does
  if (const char* env = std::getenv("PYKERNELS_BF16_DOT"); env && *env) (void)pk::cpu::bf16_dot_pays();
  // PYKERNELS_CPU_PREFETCH=l1|l2|l1-ungrouped|l1-grouped|auto: likewise
  if (const char* env = std::getenv("PYKERNELS_CPU_PREFETCH"); env && *env) (void)pk::cpu::stream_prefetch();
  // PYKERNELS_CPU_PREFETCH_NEAR=on|off|auto and PYKERNELS_CPU_PREFETCH_DISTANCE=<bytes>|auto: likewise
  if (const char* env = std::getenv("PYKERNELS_CPU_PREFETCH_NEAR"); env && *env) (void)pk::cpu::stream_prefetch_near();
  if (const char* env = std::getenv("PYKERNELS_CPU_PREFETCH_DISTANCE"); env && *env) (void)pk::cpu::stream_prefetch_distance();
  if (const char* env = std::getenv("PYKERNELS_CPU_GEMV_STREAMS"); env && *env) (void)pk::cpu::gemv_streams();
  if (const char* env = std::getenv("PYKERNELS_CPU_PAGED_STEP"); env && *env) (void)pk::cpu::paged_step();
  // The setters take an optional source: the reason cpu_features() reports (default: the setter's name).
  const auto source_of = [](const py::object& source, const char* fallback) {
    if (source.is_none()) return std::string(fallback);
    if (!py::isinstance<py::str>(source))
      throw py::type_error("argument 'source' must be a str or None, got " + std::string(py::str(py::type::of(source).attr("__name__"))));
    return source.cast<std::string>();
  };
  m.def("set_cpu_prefetch_near", [source_of](const py::object& on, const py::object& source) {
    if (!py::isinstance<py::bool_>(on))
      throw py::type_error("argument 'on' must be a bool, got " + std::string(py::str(py::type::of(on).attr("__name__"))));
    pk::cpu::set_stream_prefetch_near(on.cast<bool>(), source_of(source, "set_stream_prefetch_near").c_str());
  }, py::arg("on"), py::arg("source") = py::none());
  m.def("set_cpu_prefetch", [source_of](const std::string& level, const py::object& source) {
    pk::cpu::PrefetchLevel l;
    if (!pk::cpu::parse_stream_prefetch(level.c_str(), &l))
      throw py::value_error("argument 'level' must be 'l1', 'l2', 'l1-ungrouped' or 'l1-grouped', got '" + level + "'");
    pk::cpu::set_stream_prefetch(l, source_of(source, "set_stream_prefetch").c_str());
  }, py::arg("level"), py::arg("source") = py::none());
  m.def("set_cpu_prefetch_distance", [source_of](const py::object& nbytes, const py::object& source) {
    const int64_t v = int_arg("set_cpu_prefetch_distance", "nbytes", nbytes);
    if (!pk::cpu::prefetch_distance_ok(v))
      fail("set_cpu_prefetch_distance", "argument 'nbytes' must be a multiple of 1024 in " +
                                            std::to_string(pk::cpu::kPrefetchDistanceMin) + ".." +
                                            std::to_string(pk::cpu::kPrefetchDistanceMax) + ", got " + std::string(py::str(nbytes)));
    pk::cpu::set_stream_prefetch_distance(v, source_of(source, "set_stream_prefetch_distance").c_str());
  }, py::arg("nbytes"), py::arg("source") = py::none());
  m.def("set_cpu_gemv_streams", [source_of](const py::object& rows, const py::object& source) {
    const int64_t v = int_arg("set_cpu_gemv_streams", "rows", rows);
    if (v != 4 && v != 8) fail("set_cpu_gemv_streams", "argument 'rows' must be 4 or 8, got " + std::string(py::str(rows)));
    pk::cpu::set_gemv_streams(static_cast<int>(v), source_of(source, "set_gemv_streams").c_str());
  }, py::arg("rows"), py::arg("source") = py::none());
  m.def("set_cpu_paged_step", [source_of](const py::object& tokens, const py::object& source) {
    const int64_t v = int_arg("set_cpu_paged_step", "tokens", tokens);
    if (!pk::cpu::paged_step_ok(v))
      fail("set_cpu_paged_step", "argument 'tokens' must be 16, 32, 64 or 128, got " + std::string(py::str(tokens)));
    pk::cpu::set_paged_step(v, source_of(source, "set_paged_step").c_str());
  }, py::arg("tokens"), py::arg("source") = py::none());
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
  m.def("probe_kinds", &probe_kinds);
  m.def("probe_compute", &probe_compute, py::arg("kind"), py::arg("threads") = py::none(), py::arg("seconds") = 0.3);
  m.def("probe_memory", &probe_memory, py::arg("kind"), py::arg("nbytes") = py::none(),
        py::arg("threads") = py::none(), py::arg("reps") = 5);
  m.def("probe_clock", &probe_clock, py::arg("threads") = py::none());
  py::class_<pk::cpu::ReadPass>(m, "ReadPass",
                                "The read probe (probe_memory's 'read') over an array allocated once: run() reads "
                                "it once and returns the wall seconds.")
      .def(py::init(&make_read_pass), py::arg("nbytes") = py::none(), py::arg("threads") = py::none())
      .def_property_readonly("nbytes", &pk::cpu::ReadPass::nbytes)
      .def("run", &pk::cpu::ReadPass::run, py::call_guard<py::gil_scoped_release>());
  py::class_<pk::cpu::ComputePass>(m, "ComputePass",
                                   "A compute probe's loop (probe_compute's kind) with fixed work, about `seconds` "
                                   "per run: run() executes it once on every thread and returns the wall seconds; "
                                   "flop is the work of one run.")
      .def(py::init(&make_compute_pass), py::arg("kind"), py::arg("threads") = py::none(), py::arg("seconds") = 0.01)
      .def_property_readonly("kind", &pk::cpu::ComputePass::kind)
      .def_property_readonly("threads", &pk::cpu::ComputePass::threads)
      .def_property_readonly("flop", &pk::cpu::ComputePass::flop)
      .def("run", &pk::cpu::ComputePass::run, py::call_guard<py::gil_scoped_release>());
  m.def("probe_cuda_compute", &probe_cuda_compute, py::arg("kind"), py::arg("seconds") = 0.3);
  m.def("probe_cuda_memory", &probe_cuda_memory, py::arg("kind"), py::arg("nbytes") = py::none(),
        py::arg("reps") = 5);
  m.def("set_num_threads", [](int64_t n) {
    if (n < 1 || n > kMaxProbeThreads)
      fail("set_num_threads", "argument 'n' must be 1.." + std::to_string(kMaxProbeThreads) + ", got " + std::to_string(n));
    pk::cpu::set_num_threads(int(n));
  }, py::arg("n"));
  m.def("get_num_threads", &pk::cpu::max_threads);
#if defined(PK_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
