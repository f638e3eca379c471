// Hardware peak probes of the CPU: what the silicon can do, measured, as the denominator of "% of peak".
//
// Compute: a register-resident loop of the widest multiply-add per dtype, written in inline asm so that the
//   compiler can neither merge the independent chains (it merges identical ones, see docs) nor hoist or
//   drop the loop: every instruction counted is in the object code (check: objdump -d on the module shows
//   16 vfmadd231ps zmm between the loop label and its jnz). Accumulators per thread cover latency x
//   throughput with room: AVX-512 FMA is 4 cycles x 2 per cycle = 8 chains on Sapphire Rapids and Zen 5
//   (Zen 4: 4 x 1 zmm per cycle = 4); 16 chains are used. AVX2: 12 ymm chains (8 needed at 4 x 2).
//   Values stay zero: FMA throughput on these cores does not depend on the data, and zeros never reach
//   denormals or infinities.
// Memory: STREAM-style read (sum), copy, triad (a = b + s*c) and copy with non-temporal stores over arrays
//   >= 4x the last-level cache, each thread on its own static chunk, first-touched by that same thread.
//   Bytes counted as STREAM does (read + written; the write-allocate read of a regular store is not
//   counted, which is why copy_nt can show more than copy).
// Clock: a chain of dependent `add reg, reg` (latency 1 cycle on every x86 and Arm core we know; reg-reg,
//   not reg-imm, so that a renamer that folds immediate adds cannot shorten it), timed with steady_clock.
#include "cpu/probes.h"

#include <omp.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

#include "cpu/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define PK_PROBE_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define PK_PROBE_ARM 1
#endif

namespace pk::cpu {
namespace {

using Clock = std::chrono::steady_clock;

volatile double g_sink;  // results written here cannot be optimized away

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// CPU time of the calling thread: it advances only while the thread holds a core, so work / CPU time is the
// core's own rate even when other processes share the machine.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

int resolve_threads(int threads) { return threads > 0 ? threads : std::max(1, omp_get_max_threads()); }

// ---- compute loops -------------------------------------------------------------------------------------
// Each runs `iters` iterations of its block of independent multiply-adds and returns nothing: the asm is
// volatile, so it cannot be removed, and its loop lives inside the asm, so it cannot be shortened.

#define PK_R16(M, ins) \
  M(ins, 0) M(ins, 1) M(ins, 2) M(ins, 3) M(ins, 4) M(ins, 5) M(ins, 6) M(ins, 7) M(ins, 8) M(ins, 9) \
  M(ins, 10) M(ins, 11) M(ins, 12) M(ins, 13) M(ins, 14) M(ins, 15)
#define PK_R12(M, ins) \
  M(ins, 0) M(ins, 1) M(ins, 2) M(ins, 3) M(ins, 4) M(ins, 5) M(ins, 6) M(ins, 7) M(ins, 8) M(ins, 9) \
  M(ins, 10) M(ins, 11)

#if defined(PK_PROBE_X86)
// dst_i = zmm16 * zmm17 + dst_i (AT&T operand order: src3, src2, dst).
#define PK_ZOP(ins, i) ins " %%zmm17, %%zmm16, %%zmm" #i "\n\t"
#define PK_ZZERO(ins, i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define PK_YOP(ins, i) ins " %%ymm13, %%ymm12, %%ymm" #i "\n\t"
#define PK_YZERO(ins, i) "vxorps %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n\t"
#define PK_ZCLOBBER                                                                                          \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", \
      "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "cc"

#define PK_ZLOOP(ins)                                                              \
  __asm__ volatile(PK_R16(PK_ZZERO, _) PK_ZZERO(_, 16) PK_ZZERO(_, 17)           \
                   ".p2align 5\n\t"                                                \
                   "1:\n\t" PK_R16(PK_ZOP, ins) "dec %0\n\t"                       \
                   "jnz 1b\n\t"                                                    \
                   "vzeroupper\n\t"                                                \
                   : "+r"(iters)                                                   \
                   :                                                               \
                   : PK_ZCLOBBER)

__attribute__((target("avx512f"), noinline)) void loop_avx512_fp32(uint64_t iters) {
  PK_ZLOOP("vfmadd231ps");
}
__attribute__((target("avx512f,avx512bf16"), noinline)) void loop_avx512_bf16(uint64_t iters) {
  PK_ZLOOP("vdpbf16ps");
}
__attribute__((target("avx512f,avx512fp16"), noinline)) void loop_avx512_fp16(uint64_t iters) {
  PK_ZLOOP("vfmadd231ph");
}
__attribute__((target("avx2,fma"), noinline)) void loop_avx2_fp32(uint64_t iters) {
  __asm__ volatile(PK_R12(PK_YZERO, _) PK_YZERO(_, 12) PK_YZERO(_, 13)
                   ".p2align 5\n\t"
                   "1:\n\t" PK_R12(PK_YOP, "vfmadd231ps") "dec %0\n\t"
                   "jnz 1b\n\t"
                   "vzeroupper\n\t"
                   : "+r"(iters)
                   :
                   : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                     "xmm11", "xmm12", "xmm13", "cc");
}
// AMX: 4 C tiles (tmm0-3) += A tiles (tmm4, tmm5) x B tiles (tmm6, tmm7), 2x2 as oneDNN blocks its BF16
// GEMM; each tdpbf16ps is 16 x 16 x 32 multiply-adds. Needs the tile-data permission (features().amx_bf16
// asked for it). Unverified: no machine with AMX was available when this was written.
__attribute__((noinline)) void loop_amx_bf16(uint64_t iters) {
  alignas(64) unsigned char cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    cfg[16 + 2 * t] = 64;  // bytes per row (low byte of the u16 colsb)
    cfg[48 + t] = 16;      // rows
  }
  __asm__ volatile(
      "ldtilecfg %1\n\t"
      "tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3\n\t"
      "tilezero %%tmm4\n\ttilezero %%tmm5\n\ttilezero %%tmm6\n\ttilezero %%tmm7\n\t"
      ".p2align 5\n\t"
      "1:\n\t"
      "tdpbf16ps %%tmm6, %%tmm4, %%tmm0\n\t"
      "tdpbf16ps %%tmm7, %%tmm4, %%tmm1\n\t"
      "tdpbf16ps %%tmm6, %%tmm5, %%tmm2\n\t"
      "tdpbf16ps %%tmm7, %%tmm5, %%tmm3\n\t"
      "dec %0\n\t"
      "jnz 1b\n\t"
      "tilerelease\n\t"
      : "+r"(iters)
      : "m"(cfg)
      : "cc", "memory");
}

bool cpu_has_avx512_fp16() {
  unsigned a, b, c, d;
  if (!features().avx512f || __get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return d & (1u << 23);
}
#endif  // PK_PROBE_X86

#if defined(PK_PROBE_ARM)
// v_i = v16 * v17 + v_i, 16 chains: Neoverse V1/V2 run 4 x 128-bit FMA per cycle at 4 cycles latency.
#define PK_NOP(ins, i) ins " v" #i ".4s, v16.4s, v17.4s\n\t"
#define PK_NZERO(ins, i) "movi v" #i ".4s, #0\n\t"
__attribute__((noinline)) void loop_neon_fp32(uint64_t iters) {
  __asm__ volatile(PK_R16(PK_NZERO, _) PK_NZERO(_, 16) PK_NZERO(_, 17)
                   "1:\n\t" PK_R16(PK_NOP, "fmla") "subs %0, %0, #1\n\t"
                   "b.ne 1b\n\t"
                   : "+r"(iters)
                   :
                   : "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13",
                     "v14", "v15", "v16", "v17", "cc");
}
#endif

struct ComputeKind {
  const char* name;
  const char* instruction;
  int accumulators;          // independent chains
  double flop_per_instruction;
  int instructions_per_iter;
  void (*fn)(uint64_t);
  bool (*available)();
};

const std::vector<ComputeKind>& compute_table() {
  static const std::vector<ComputeKind> t = {
#if defined(PK_PROBE_X86)
      // tdpbf16ps: 16 rows x 16 columns x 32 (K) multiply-adds.
      {"amx_bf16", "tdpbf16ps tmm", 4, 2.0 * 16 * 16 * 32, 4, loop_amx_bf16, [] { return features().amx_bf16; }},
      // vdpbf16ps zmm: 16 fp32 lanes x 2 bf16 products, each accumulated: 64 FLOP.
      {"avx512_bf16", "vdpbf16ps zmm", 16, 64, 16, loop_avx512_bf16, [] { return features().avx512_bf16; }},
      {"avx512_fp16", "vfmadd231ph zmm", 16, 64, 16, loop_avx512_fp16, [] { return cpu_has_avx512_fp16(); }},
      {"avx512_fp32", "vfmadd231ps zmm", 16, 32, 16, loop_avx512_fp32, [] { return features().avx512f; }},
      {"avx2_fp32", "vfmadd231ps ymm", 12, 16, 12, loop_avx2_fp32, [] { return features().avx2_fma; }},
#endif
#if defined(PK_PROBE_ARM)
      {"neon_fp32", "fmla v.4s", 16, 8, 16, loop_neon_fp32, [] { return true; }},
#endif
  };
  return t;
}

const ComputeKind* find_kind(const std::string& kind) {
  for (const auto& k : compute_table())
    if (kind == k.name) return &k;
  return nullptr;
}

// ---- clock loop ------------------------------------------------------------------------------------
constexpr int kClockChain = 100;  // dependent adds per iteration; the loop counter runs beside the chain

#define PK_X10(s) s s s s s s s s s s
__attribute__((noinline)) void loop_clock(uint64_t iters) {
  uint64_t acc = 0, one = 1;
#if defined(PK_PROBE_X86)
  __asm__ volatile(".p2align 5\n\t"
                   "1:\n\t" PK_X10(PK_X10("add %2, %1\n\t")) "dec %0\n\t"
                   "jnz 1b\n\t"
                   : "+r"(iters), "+r"(acc)
                   : "r"(one)
                   : "cc");
#elif defined(PK_PROBE_ARM)
  __asm__ volatile("1:\n\t" PK_X10(PK_X10("add %1, %1, %2\n\t")) "subs %0, %0, #1\n\t"
                   "b.ne 1b\n\t"
                   : "+r"(iters), "+r"(acc)
                   : "r"(one)
                   : "cc");
#else
  volatile uint64_t v = 0;  // no asm for this ISA: a volatile chain (load + add + store, not 1 cycle)
  for (uint64_t i = 0; i < iters * kClockChain; ++i) v = v + one;
  acc = v;
#endif
  g_sink = double(acc);
}
static_assert(kClockChain == 100, "loop_clock's asm holds exactly 100 adds");

// Iterations of fn that take about `target_s` on this thread (at least 1).
uint64_t calibrate(void (*fn)(uint64_t), double target_s) {
  uint64_t it = 1 << 10;
  for (;;) {
    const auto t0 = Clock::now();
    fn(it);
    const double t = seconds_since(t0);
    if (t >= 2e-3 || it >= (uint64_t(1) << 40)) {
      const double per = t / double(it);
      return std::max<uint64_t>(1, uint64_t(target_s / std::max(per, 1e-12)));
    }
    it *= 4;
  }
}

// ---- memory ------------------------------------------------------------------------------------------
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buf = std::unique_ptr<float, FreeDeleter>;

Buf alloc_floats(int64_t n) {
  const size_t bytes = (size_t(n) * sizeof(float) + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, bytes);
  if (!p) throw std::bad_alloc();
  return Buf(static_cast<float*>(p));
}

// [lo, hi) of thread t of T over n floats, in whole 16-float (64-byte) lines.
void chunk(int64_t n, int t, int T, int64_t* lo, int64_t* hi) {
  const int64_t lines = n / 16, per = lines / T, extra = lines % T;
  const int64_t a = t * per + std::min<int64_t>(t, extra);
  const int64_t b = a + per + (t < extra ? 1 : 0);
  *lo = a * 16;
  *hi = b * 16;
}

enum class Mem { Read, Copy, Triad, CopyNt };
constexpr float kTriadScalar = 3.0f;

#if defined(PK_PROBE_X86)
// AVX-512 / AVX2 bodies with explicit vector loads and stores: a plain copy loop would be turned into a
// memcpy call, and glibc's memcpy switches to non-temporal stores for large sizes, so "copy" would
// silently be "copy_nt".
__attribute__((target("avx512f"))) double body_avx512(Mem m, float* a, float* b, float* c, int64_t lo, int64_t hi) {
  switch (m) {
    case Mem::Read: {
      // Four sequential streams per thread (its chunk cut in four), a line of each per step: one stream
      // per core leaves the prefetchers and the core's outstanding misses under-used (measured on the Zen 4
      // VM: a one-stream read reached ~26 GB/s where the GEMV kernel, which walks several rows, read 55).
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      const int64_t q = (hi - lo) / 64 * 16;  // floats per stream, whole lines
      const float* a0 = a + lo;
      for (int64_t i = 0; i < q; i += 16) {
        s0 = _mm512_add_ps(s0, _mm512_load_ps(a0 + i));
        s1 = _mm512_add_ps(s1, _mm512_load_ps(a0 + q + i));
        s2 = _mm512_add_ps(s2, _mm512_load_ps(a0 + 2 * q + i));
        s3 = _mm512_add_ps(s3, _mm512_load_ps(a0 + 3 * q + i));
      }
      for (int64_t i = lo + 4 * q; i < hi; i += 16) s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
      alignas(64) float t[16];
      _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
      double r = 0;
      for (float x : t) r += x;
      return r;
    }
    case Mem::Copy:
      for (int64_t i = lo; i < hi; i += 16) _mm512_store_ps(c + i, _mm512_load_ps(a + i));
      return 0;
    case Mem::CopyNt:
      for (int64_t i = lo; i < hi; i += 16) _mm512_stream_ps(c + i, _mm512_load_ps(a + i));
      _mm_sfence();
      return 0;
    case Mem::Triad: {
      const __m512 s = _mm512_set1_ps(kTriadScalar);
      for (int64_t i = lo; i < hi; i += 16)
        _mm512_store_ps(a + i, _mm512_add_ps(_mm512_load_ps(b + i), _mm512_mul_ps(s, _mm512_load_ps(c + i))));
      return 0;
    }
  }
  return 0;
}

__attribute__((target("avx2"))) double body_avx2(Mem m, float* a, float* b, float* c, int64_t lo, int64_t hi) {
  switch (m) {
    case Mem::Read: {
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t i = lo; i < hi; i += 32) {  // hi - lo is a multiple of 16; 32 = two lines
        if (i + 32 <= hi) {
          s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
          s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
          s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
          s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
        } else {
          s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
          s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
        }
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
      return double(t[0]) + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    }
    case Mem::Copy:
      for (int64_t i = lo; i < hi; i += 8) _mm256_store_ps(c + i, _mm256_load_ps(a + i));
      return 0;
    case Mem::CopyNt:
      for (int64_t i = lo; i < hi; i += 8) _mm256_stream_ps(c + i, _mm256_load_ps(a + i));
      _mm_sfence();
      return 0;
    case Mem::Triad: {
      const __m256 s = _mm256_set1_ps(kTriadScalar);
      for (int64_t i = lo; i < hi; i += 8)
        _mm256_store_ps(a + i, _mm256_add_ps(_mm256_load_ps(b + i), _mm256_mul_ps(s, _mm256_load_ps(c + i))));
      return 0;
    }
  }
  return 0;
}

// SSE2 is part of x86-64, so this one needs no run-time check.
double body_sse2(Mem m, float* a, float* b, float* c, int64_t lo, int64_t hi) {
  switch (m) {
    case Mem::Read: {
      __m128 s0 = _mm_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t i = lo; i < hi; i += 16) {
        s0 = _mm_add_ps(s0, _mm_load_ps(a + i));
        s1 = _mm_add_ps(s1, _mm_load_ps(a + i + 4));
        s2 = _mm_add_ps(s2, _mm_load_ps(a + i + 8));
        s3 = _mm_add_ps(s3, _mm_load_ps(a + i + 12));
      }
      alignas(16) float t[4];
      _mm_store_ps(t, _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3)));
      return double(t[0]) + t[1] + t[2] + t[3];
    }
    case Mem::Copy:
      for (int64_t i = lo; i < hi; i += 4) _mm_store_ps(c + i, _mm_load_ps(a + i));
      return 0;
    case Mem::CopyNt:
      for (int64_t i = lo; i < hi; i += 4) _mm_stream_ps(c + i, _mm_load_ps(a + i));
      _mm_sfence();
      return 0;
    case Mem::Triad: {
      const __m128 s = _mm_set1_ps(kTriadScalar);
      for (int64_t i = lo; i < hi; i += 4)
        _mm_store_ps(a + i, _mm_add_ps(_mm_load_ps(b + i), _mm_mul_ps(s, _mm_load_ps(c + i))));
      return 0;
    }
  }
  return 0;
}

#else
// Portable body (non-x86). no-tree-loop-distribute-patterns keeps the copy a loop (not a memcpy call, which
// may use non-temporal stores of its own); there are no portable non-temporal stores, so copy_nt is a copy.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
double body_plain(Mem m, float* a, float* b, float* c, int64_t lo, int64_t hi) {
  switch (m) {
    case Mem::Read: {
      float s[16] = {};
      for (int64_t i = lo; i < hi; i += 16)
        for (int j = 0; j < 16; ++j) s[j] += a[i + j];
      double r = 0;
      for (float x : s) r += x;
      return r;
    }
    case Mem::Copy:
    case Mem::CopyNt:
      for (int64_t i = lo; i < hi; ++i) c[i] = a[i];
      return 0;
    case Mem::Triad:
      for (int64_t i = lo; i < hi; ++i) a[i] = b[i] + kTriadScalar * c[i];
      return 0;
  }
  return 0;
}
#endif

using Body = double (*)(Mem, float*, float*, float*, int64_t, int64_t);

Body pick_body(const char** store_desc, bool nt) {
#if defined(PK_PROBE_X86)
  if (features().avx512f) {
    *store_desc = nt ? "non-temporal (AVX-512 vmovntps)" : "regular (AVX-512)";
    return body_avx512;
  }
  if (features().avx2_fma) {
    *store_desc = nt ? "non-temporal (AVX2 vmovntps)" : "regular (AVX2)";
    return body_avx2;
  }
  *store_desc = nt ? "non-temporal (SSE2 movntps)" : "regular (SSE2)";
  return body_sse2;
#else
  *store_desc = nt ? "regular (no portable non-temporal store on this ISA)" : "regular";
  return body_plain;
#endif
}

}  // namespace

// ---- public ------------------------------------------------------------------------------------------

std::vector<std::string> probe_compute_known() {
  std::vector<std::string> out;
  for (const auto& k : compute_table()) out.emplace_back(k.name);
  return out;
}

std::vector<std::string> probe_compute_kinds() {
  std::vector<std::string> out;
  for (const auto& k : compute_table())
    if (k.available()) out.emplace_back(k.name);
  return out;
}

std::vector<std::string> probe_memory_kinds() { return {"read", "copy", "triad", "copy_nt"}; }

// Largest cache of cpu0 from sysfs (as pykernels/harness/timing.py reads it). Not sysconf: glibc reports
// 320 MiB of L3 on the 2-core Zen 4 VM whose sysfs (and lscpu) say 32 MiB.
int64_t llc_bytes() {
  int64_t best = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size";
    std::FILE* f = std::fopen(dir.c_str(), "r");
    if (!f) continue;
    long long v = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &v, &unit);
    std::fclose(f);
    if (got < 1 || v <= 0) continue;
    const int64_t bytes = unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : unit == 'G' ? v << 30 : v;
    best = std::max(best, bytes);
  }
  return best;
}

int64_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? int64_t(pages) * int64_t(page) : 0;
}

int64_t probe_memory_default_bytes() {
  const int64_t llc = llc_bytes() > 0 ? llc_bytes() : (int64_t(32) << 20);
  return std::max(int64_t(256) << 20, 4 * llc);
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("argument 'n' must be >= 1");
  omp_set_num_threads(n);
}

namespace {
// The probe kind `kind`, checked runnable here, and `seconds` checked positive (probe_compute, ComputePass).
const ComputeKind* checked_kind(const std::string& kind, double seconds) {
  const ComputeKind* k = find_kind(kind);
  if (!k || !k->available())
    throw std::invalid_argument("argument 'kind': compute probe '" + kind + "' is unknown or not runnable here");
  if (!(seconds > 0) || !std::isfinite(seconds)) throw std::invalid_argument("argument 'seconds' must be > 0");
  return k;
}
}  // namespace

ComputeProbe probe_compute(const std::string& kind, int threads, double seconds) {
  const ComputeKind* k = checked_kind(kind, seconds);
  const int T = resolve_threads(threads);
  // Many short trials (~10 ms), best one counts: on a shared machine a trial in which another process held
  // one of the cores is slow, and the more trials, the likelier one ran with every thread on a core.
  const int trials = int(std::clamp(seconds / 0.01, 5.0, 100.0));
  ComputeProbe r;
  r.kind = k->name;
  r.instruction = k->instruction;
  r.threads = T;
  r.accumulators = k->accumulators;
  r.flop_per_instruction = k->flop_per_instruction;
  k->fn(1 << 12);  // wake the vector unit (AVX-512 power-up) before calibrating
  const uint64_t iters = calibrate(k->fn, std::max(2e-3, seconds / trials));
  const double flop_per_thread = double(iters) * k->instructions_per_iter * k->flop_per_instruction;
  r.iterations = iters;
  r.trial_seconds.assign(trials, 0.0);
  std::vector<double> cpu_best(T, 1e30);
  Clock::time_point t0;
  int team = T;  // what OpenMP actually gave (OMP_THREAD_LIMIT, nesting can give fewer)
#pragma omp parallel num_threads(T)
  {
    const int tid = omp_get_thread_num();
#pragma omp master
    team = omp_get_num_threads();
    k->fn(std::max<uint64_t>(1, iters / 8));  // every thread warm before the first timed trial
    for (int trial = 0; trial < trials; ++trial) {
#pragma omp barrier
#pragma omp master
      t0 = Clock::now();
#pragma omp barrier
      const double c0 = thread_cpu_seconds();
      k->fn(iters);
      const double c = thread_cpu_seconds() - c0;
      if (tid < T && c > 0) cpu_best[tid] = std::min(cpu_best[tid], c);
#pragma omp barrier
#pragma omp master
      r.trial_seconds[trial] = seconds_since(t0);
    }
  }
  const double best = *std::min_element(r.trial_seconds.begin(), r.trial_seconds.end());
  for (double t : r.trial_seconds) r.seconds += t;
  r.threads = team;
  r.flops = double(team) * flop_per_thread / best;
  for (double c : cpu_best)
    if (c < 1e30) r.flops_cpu_time += flop_per_thread / c;
  return r;
}

MemoryProbe probe_memory(const std::string& kind, int64_t nbytes, int threads, int reps) {
  Mem m;
  int arrays;
  double factor;  // bytes moved per array byte
  if (kind == "read") {
    m = Mem::Read, arrays = 1, factor = 1;
  } else if (kind == "copy") {
    m = Mem::Copy, arrays = 2, factor = 2;
  } else if (kind == "triad") {
    m = Mem::Triad, arrays = 3, factor = 3;
  } else if (kind == "copy_nt") {
    m = Mem::CopyNt, arrays = 2, factor = 2;
  } else {
    throw std::invalid_argument("argument 'kind': memory probe '" + kind + "' is unknown");
  }
  if (reps < 1) throw std::invalid_argument("argument 'reps' must be >= 1");
  if (nbytes <= 0) nbytes = probe_memory_default_bytes();
  nbytes = nbytes / 64 * 64;
  if (nbytes < 64) throw std::invalid_argument("argument 'nbytes' must be >= 64");
  const int T = resolve_threads(threads);
  const int64_t n = nbytes / int64_t(sizeof(float));

  MemoryProbe r;
  r.kind = kind;
  r.nbytes = nbytes;
  r.arrays = arrays;
  r.bytes_per_rep = factor * double(nbytes);
  r.threads = T;
  const char* store = "regular";
  const Body body = pick_body(&store, m == Mem::CopyNt);
  r.store = store;

  // read: a; copy: a -> c; triad: a = b + s*c.
  Buf a = alloc_floats(n), b = arrays == 3 ? alloc_floats(n) : Buf(), c = arrays >= 2 ? alloc_floats(n) : Buf();
  float *pa = a.get(), *pb = b.get(), *pc = c.get();
  // First touch by the thread that will use the chunk, so its pages sit on that thread's NUMA node.
#pragma omp parallel num_threads(T)
  {
    int64_t lo, hi;
    chunk(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    for (int64_t i = lo; i < hi; ++i) {
      pa[i] = 1.0f;
      if (pb) pb[i] = 2.0f;
      if (pc) pc[i] = 0.5f;
    }
  }
  r.rep_seconds.reserve(reps);
  int team = T;
  for (int rep = -1; rep < reps; ++rep) {  // rep -1: untimed warm-up
    double total = 0;
    const auto t0 = Clock::now();
#pragma omp parallel num_threads(T) reduction(+ : total)
    {
#pragma omp master
      team = omp_get_num_threads();
      int64_t lo, hi;
      chunk(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
      total += body(m, pa, pb, pc, lo, hi);
    }
    const double t = seconds_since(t0);
    g_sink = total;
    if (rep >= 0) r.rep_seconds.push_back(t);
  }
  r.threads = team;
  const double best = *std::min_element(r.rep_seconds.begin(), r.rep_seconds.end());
  r.gbs = r.bytes_per_rep / best / 1e9;
  return r;
}

struct ReadPass::Impl {
  Buf a;
  int64_t n = 0;
  int threads = 0;
  Body body = nullptr;
};

ReadPass::ReadPass(int64_t nbytes, int threads) : impl_(new Impl) {
  if (nbytes <= 0) nbytes = probe_memory_default_bytes();
  nbytes = nbytes / 64 * 64;
  if (nbytes < 64) throw std::invalid_argument("argument 'nbytes' must be >= 64");
  impl_->n = nbytes / int64_t(sizeof(float));
  impl_->threads = resolve_threads(threads);
  const char* store = "regular";
  impl_->body = pick_body(&store, false);
  impl_->a = alloc_floats(impl_->n);
  float* pa = impl_->a.get();
  const int64_t n = impl_->n;
#pragma omp parallel num_threads(impl_->threads)
  {
    int64_t lo, hi;
    chunk(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    for (int64_t i = lo; i < hi; ++i) pa[i] = 1.0f;
  }
}

ReadPass::~ReadPass() = default;

int64_t ReadPass::nbytes() const { return impl_->n * int64_t(sizeof(float)); }

double ReadPass::run() const {
  const Impl& s = *impl_;
  double total = 0;
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(s.threads) reduction(+ : total)
  {
    int64_t lo, hi;
    chunk(s.n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    total += s.body(Mem::Read, s.a.get(), nullptr, nullptr, lo, hi);
  }
  const double t = seconds_since(t0);
  g_sink = total;
  return t;
}

ComputePass::ComputePass(const std::string& kind, int threads, double seconds) {
  const ComputeKind* k = checked_kind(kind, seconds);
  kind_ = k->name;
  fn_ = k->fn;
  fn_(1 << 12);  // wake the vector unit (AVX-512 power-up) before calibrating
  iters_ = calibrate(fn_, seconds);
  int team = 1;  // what OpenMP gives (OMP_THREAD_LIMIT can give fewer than asked)
#pragma omp parallel num_threads(resolve_threads(threads))
#pragma omp master
  team = omp_get_num_threads();
  threads_ = team;
  flop_ = double(team) * double(iters_) * k->instructions_per_iter * k->flop_per_instruction;
}

double ComputePass::run() const {
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads_)
  fn_(iters_);
  return seconds_since(t0);
}

ClockProbe probe_clock(int threads) {
  const int T = resolve_threads(threads);
  constexpr int kTrials = 10;
  ClockProbe r;
  r.threads = T;
  r.chain = kClockChain;
  loop_clock(1 << 10);
  const uint64_t iters = calibrate(loop_clock, 0.005);  // ~5 ms per trial
  r.per_thread_ghz.assign(T, 0.0);
  std::vector<double> wall_ghz(T, 0.0);
  int team = T;
  // Per thread, the best trial by its own CPU time: a trial during which the thread lost its core to another
  // process is no slower per CPU second, so the clock reads right on a shared machine (by wall time it reads
  // low there: on the 2-core VM under a load average of 8, 1.9 GHz instead of 3.7). The wall figure is kept.
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
#pragma omp master
    team = omp_get_num_threads();
    loop_clock(iters / 4);
    double best_cpu = 1e30, best_wall = 1e30;
    for (int trial = 0; trial < kTrials; ++trial) {
      const auto t0 = Clock::now();
      const double c0 = thread_cpu_seconds();
      loop_clock(iters);
      const double c = thread_cpu_seconds() - c0;
      best_wall = std::min(best_wall, seconds_since(t0));
      if (c > 0) best_cpu = std::min(best_cpu, c);
    }
    if (t < T) {
      r.per_thread_ghz[t] = double(iters) * kClockChain / std::min(best_cpu, best_wall) / 1e9;
      wall_ghz[t] = double(iters) * kClockChain / best_wall / 1e9;
    }
  }
  double sum = 0, wsum = 0;
  r.ghz_min = 1e30;
  r.ghz_max = 0;
  r.per_thread_ghz.resize(team);
  r.threads = team;
  for (int t = 0; t < team; ++t) {
    const double g = r.per_thread_ghz[t];
    sum += g;
    wsum += wall_ghz[t];
    r.ghz_min = std::min(r.ghz_min, g);
    r.ghz_max = std::max(r.ghz_max, g);
  }
  r.ghz = sum / team;
  r.ghz_wall = wsum / team;
  return r;
}

}  // namespace pk::cpu
