// Run-time CPU feature detection: the kernels pick their AVX-512 / BF16 / AMX path from this, so a
// binary built on one x86-64 machine never executes an instruction another one lacks.
#include "cpu/cpu.h"
#include "cpu/probes.h"

#include <omp.h>

#include <atomic>
#include <cerrno>
#include <mutex>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pk::cpu {
namespace {

#if defined(__x86_64__)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux hands out the AMX tile-data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

Features detect() {
  Features f{false, false, false, false, false};
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  const bool tile_os = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512bf16 = a1 & (1u << 5);
  f.avx2_fma = ymm_os && avx2 && fma;
  f.avx512f = zmm_os && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_bf16 = f.avx512f && avx512bf16;
  f.amx_bf16 = tile_os && amx_tile && amx_bf16 && request_amx_permission();
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory in ARMv8-A (and in the Linux aarch64 ABI)
#endif
  return f;
}

}  // namespace

const Features& features() {
  static const Features f = detect();
  return f;
}

int max_threads() { return omp_get_max_threads(); }

// ---- ISA tiers ---------------------------------------------------------------------------------------
const char* isa_name(Isa t) {
  switch (t) {
    case Isa::amx: return "amx";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::neon: return "neon";
    case Isa::portable: return "portable";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa t : kIsas) {
    if (std::strcmp(name, isa_name(t)) == 0) {
      *out = t;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa t) {
  const Features& f = features();
  switch (t) {
    case Isa::amx: return f.avx512f && f.avx2_fma && f.amx_bf16;
    case Isa::avx512: return f.avx512f && f.avx2_fma;
    case Isa::avx2: return f.avx2_fma;
    case Isa::neon: return f.neon;
    case Isa::portable: return true;
  }
  return false;
}

namespace {
Isa best_isa() {
  if (isa_supported(Isa::amx)) return Isa::amx;
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  if (isa_supported(Isa::neon)) return Isa::neon;
  return Isa::portable;
}
std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(best_isa())};
  return slot;
}
}  // namespace

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }
Isa decode_isa(int64_t D) { return tier_decode_head_dim(D) ? active_isa() : Isa::portable; }
Isa attention_isa(int64_t D, DType dt) {
  const Isa t = active_isa();
  (void)dt;  // every dtype alike: the AMX bf16 kernel and the AVX-512 / AVX2 / NEON ones take the same head dims
  return tier_attention_head_dim(D) ? t : Isa::portable;
}

void set_isa(Isa t) {
  if (!isa_supported(t))
    throw std::invalid_argument(std::string("this CPU cannot run the '") + isa_name(t) + "' tier");
  active_slot().store(static_cast<int>(t), std::memory_order_relaxed);
}

namespace {
// A decision made once per process (from the probe loops of probes.cpp, an override or the CPU), and why.
struct Choice {
  bool yes;
  const char* source;
};
// Whether probe loop `a` does at least 1.5x the FLOP of loop `b` per second of thread CPU time (one
// thread, a few ms each: robust to a shared machine); `fallback` when the probes cannot run.
Choice faster(const char* a, const char* b, bool fallback) {
  try {
    const double fa = probe_compute(a, 1, 0.004).flops_cpu_time;
    const double fb = probe_compute(b, 1, 0.004).flops_cpu_time;
    return {fa >= 1.5 * fb, "measured"};
  } catch (const std::exception&) {
    return {fallback, "default: the probes could not run"};
  }
}
const Choice& dot_choice() {
  static const Choice c = []() -> Choice {
    if (const char* e = std::getenv("PYKERNELS_BF16_DOT"); e && *e) {
      if (std::strcmp(e, "on") == 0) return {features().avx512_bf16, "PYKERNELS_BF16_DOT"};
      if (std::strcmp(e, "off") == 0) return {false, "PYKERNELS_BF16_DOT"};
      if (std::strcmp(e, "auto") != 0)
        throw std::invalid_argument(std::string("PYKERNELS_BF16_DOT: expected on, off or auto, got '") + e + "'");
    }
    if (!features().avx512_bf16) return {false, "no AVX512_BF16"};
    // widening costs instructions too: vdpbf16ps must do clearly more than the FMA to pay
    return faster("avx512_bf16", "avx512_fp32", true);
  }();
  return c;
}
const Choice& zmm_choice() {
  static const Choice c = []() -> Choice {
    if (!features().avx512f || !features().avx2_fma) return {false, "no AVX-512"};
    return faster("avx512_fp32", "avx2_fp32", false);  // 2x on full-width pipes, 1x on split ones
  }();
  return c;
}
}  // namespace

bool bf16_dot_pays() { return dot_choice().yes; }
const char* bf16_dot_source() { return dot_choice().source; }
bool zmm_fma_full_width() { return zmm_choice().yes; }
const char* zmm_fma_source() { return zmm_choice().source; }

namespace {
int cpu_family() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int base = (a >> 8) & 0xF;
  return base == 0xF ? base + static_cast<int>((a >> 20) & 0xFF) : base;
#else
  return 0;
#endif
}
bool cpu_is_amd() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  __cpuid(0, a, b, c, d);
  return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
#else
  return false;
#endif
}
// The run-time settings (decode's prefetch level, second near prefetch and distance; the GEMV's rows per step):
// each a value the kernels read
// (atomics: a decode call's threads read them while Python may set them) and the reason it has it (under a
// lock: a setter may store any string, e.g. the tuning cache it came from).
struct Setting {
  std::atomic<int64_t> value;
  std::mutex mu;
  std::string source;
  Setting(int64_t v, const char* src) : value(v), source(src) {}
  std::string get_source() {
    std::lock_guard<std::mutex> g(mu);
    return source;
  }
  void set(int64_t v, const char* src) {
    std::lock_guard<std::mutex> g(mu);
    source = src;
    value.store(v, std::memory_order_relaxed);
  }
};
bool amd_26_or_later() { return cpu_is_amd() && cpu_family() >= 26; }
// A setting from its environment variable (unset, empty or "auto": the default): parse(value, &v) is false for
// a value it does not take, which throws std::invalid_argument "VAR: expected EXPECTED or auto, got 'value'".
template <class Parse>
Setting from_env(const char* var, const char* expected, Parse parse, int64_t def, const char* def_source) {
  const char* e = std::getenv(var);
  if (!e || !*e || std::strcmp(e, "auto") == 0) return Setting(def, def_source);
  int64_t v = 0;
  if (!parse(e, &v))
    throw std::invalid_argument(std::string(var) + ": expected " + expected + " or auto, got '" + e + "'");
  return Setting(v, var);
}
// A whole decimal number, nothing after it (the numeric settings' environment variables).
bool parse_int(const char* e, int64_t* v) {
  char* end = nullptr;
  errno = 0;
  *v = std::strtoll(e, &end, 10);
  return errno == 0 && end != e && *end == '\0';
}
Setting& level_setting() {
  static Setting s = from_env(
      "PYKERNELS_CPU_PREFETCH", "l1, l2, l1-ungrouped, l1-grouped",
      [](const char* e, int64_t* v) {
        PrefetchLevel l;
        return parse_stream_prefetch(e, &l) && (*v = static_cast<int64_t>(l), true);
      },
      static_cast<int64_t>(amd_26_or_later() ? PrefetchLevel::l1_ungrouped : PrefetchLevel::l2),
      amd_26_or_later() ? "default: AMD family >= 26 (measured on Zen 5)" : "default: L2 (measured on Sapphire Rapids and Zen 4)");
  return s;
}
Setting& near_setting() {
  static Setting s = from_env(
      "PYKERNELS_CPU_PREFETCH_NEAR", "on, off",
      [](const char* e, int64_t* v) {
        *v = std::strcmp(e, "on") == 0;
        return *v || std::strcmp(e, "off") == 0;
      },
      amd_26_or_later(), amd_26_or_later() ? "default: AMD family >= 26 (measured on Zen 5)" : "default: off (not measured on this CPU)");
  return s;
}
Setting& distance_setting() {
  static Setting s = from_env(
      "PYKERNELS_CPU_PREFETCH_DISTANCE",
      ("bytes, a multiple of 1024 in " + std::to_string(kPrefetchDistanceMin) + ".." + std::to_string(kPrefetchDistanceMax) + ",").c_str(),
      [](const char* e, int64_t* v) { return parse_int(e, v) && prefetch_distance_ok(*v); },
      kPrefetchDistanceDefault, "default: 16 KB (measured on Zen 4 and Zen 5)");
  return s;
}
Setting& gemv_setting() {
  static Setting s = from_env(
      "PYKERNELS_CPU_GEMV_STREAMS", "4, 8",
      [](const char* e, int64_t* v) {
        *v = std::strcmp(e, "4") == 0 ? 4 : std::strcmp(e, "8") == 0 ? 8 : 0;
        return *v != 0;
      },
      amd_26_or_later() ? 4 : 8,
      amd_26_or_later() ? "default: AMD family >= 26 (measured on Zen 5)" : "default: 8 (measured on Sapphire Rapids and Zen 4)");
  return s;
}
Setting& paged_step_setting() {
  static const bool zen4 = cpu_is_amd() && cpu_family() == 25;  // CPUID once (a VM exit each time)
  static Setting s = from_env(
      "PYKERNELS_CPU_PAGED_STEP", "16, 32, 64, 128",
      [](const char* e, int64_t* v) { return parse_int(e, v) && paged_step_ok(*v); },
      zen4 ? 32 : 128,
      zen4 ? "default: AMD family 25 (measured on Zen 4)" : "default: 128 (not measured on this CPU with this kernel)");
  return s;
}
}  // namespace

PrefetchLevel stream_prefetch() { return static_cast<PrefetchLevel>(level_setting().value.load(std::memory_order_relaxed)); }
const char* stream_prefetch_name(PrefetchLevel l) {
  switch (l) {
    case PrefetchLevel::l1: return "l1";
    case PrefetchLevel::l2: return "l2";
    case PrefetchLevel::l1_ungrouped: return "l1-ungrouped";
    case PrefetchLevel::l1_grouped: return "l1-grouped";
  }
  return "l2";
}
bool parse_stream_prefetch(const char* name, PrefetchLevel* out) {
  for (auto l : {PrefetchLevel::l2, PrefetchLevel::l1, PrefetchLevel::l1_ungrouped, PrefetchLevel::l1_grouped})
    if (std::strcmp(name, stream_prefetch_name(l)) == 0) {
      *out = l;
      return true;
    }
  return false;
}
std::string stream_prefetch_source() { return level_setting().get_source(); }
void set_stream_prefetch(PrefetchLevel l, const char* source) {
  level_setting().set(static_cast<int64_t>(l), source ? source : "set_stream_prefetch");
}
bool stream_prefetch_near() { return near_setting().value.load(std::memory_order_relaxed) != 0; }
std::string stream_prefetch_near_source() { return near_setting().get_source(); }
void set_stream_prefetch_near(bool on, const char* source) {
  near_setting().set(on, source ? source : "set_stream_prefetch_near");
}
bool prefetch_distance_ok(int64_t bytes) {
  return bytes >= kPrefetchDistanceMin && bytes <= kPrefetchDistanceMax && bytes % 1024 == 0;
}
int64_t stream_prefetch_distance() { return distance_setting().value.load(std::memory_order_relaxed); }
std::string stream_prefetch_distance_source() { return distance_setting().get_source(); }
void set_stream_prefetch_distance(int64_t bytes, const char* source) {
  if (!prefetch_distance_ok(bytes)) throw std::invalid_argument("prefetch distance out of range");
  distance_setting().set(bytes, source ? source : "set_stream_prefetch_distance");
}

int gemv_streams() { return static_cast<int>(gemv_setting().value.load(std::memory_order_relaxed)); }
std::string gemv_streams_source() { return gemv_setting().get_source(); }
void set_gemv_streams(int rows, const char* source) {
  if (rows != 4 && rows != 8) throw std::invalid_argument("GEMV streams must be 4 or 8");
  gemv_setting().set(rows, source ? source : "set_gemv_streams");
}

bool paged_step_ok(int64_t tokens) { return tokens == 16 || tokens == 32 || tokens == 64 || tokens == 128; }
int64_t paged_step() { return paged_step_setting().value.load(std::memory_order_relaxed); }
std::string paged_step_source() { return paged_step_setting().get_source(); }
void set_paged_step(int64_t tokens, const char* source) {
  if (!paged_step_ok(tokens)) throw std::invalid_argument("paged step must be 16, 32, 64 or 128 tokens");
  paged_step_setting().set(tokens, source ? source : "set_paged_step");
}

bool stream_prefetch_l1(int64_t g) {
  const PrefetchLevel l = stream_prefetch();
  return l == PrefetchLevel::l1 || (l == PrefetchLevel::l1_ungrouped && g == 1) ||
         (l == PrefetchLevel::l1_grouped && g > 1);
}

Features enabled() {
  Features f = features();
  const Isa t = active_isa();
  if (t != Isa::amx) f.amx_bf16 = false;
  if (t != Isa::amx && t != Isa::avx512) f.avx512f = f.avx512_bf16 = false;
  if (t == Isa::portable) f.avx2_fma = false;
  if (t != Isa::neon) f.neon = false;
  return f;
}

// ---- cache sizes -------------------------------------------------------------------------------------
namespace {

// Deterministic cache parameters: leaf 4 (Intel) or 0x8000001D (AMD, with TOPOEXT), one subleaf per
// cache: type in EAX[4:0] (0 = no more), level EAX[7:5], sharing EAX[25:14]+1; size = ways x
// partitions x line x sets.
bool caches_cpuid(Caches& c) {
#if defined(__x86_64__)
  unsigned a, b, cx, d;
  unsigned leaf = 0;
  __cpuid(0, a, b, cx, d);
  const bool amd = cpu_is_amd();
  if (amd) {
    if (__get_cpuid_max(0x80000000u, nullptr) < 0x8000001Du) return false;
    __cpuid(0x80000001u, a, b, cx, d);
    if (!(cx & (1u << 22))) return false;  // TOPOEXT
    leaf = 0x8000001Du;
  } else {
    if (a < 4) return false;
    leaf = 4;
  }
  bool any = false;
  for (unsigned i = 0; i < 16; ++i) {
    __cpuid_count(leaf, i, a, b, cx, d);
    const unsigned type = a & 31u, level = (a >> 5) & 7u;
    if (type == 0) break;
    if (type == 2) continue;  // instruction cache
    const int64_t bytes = int64_t((b >> 22) + 1) * (((b >> 12) & 1023u) + 1) * ((b & 4095u) + 1) * (int64_t(cx) + 1);
    const int sharing = static_cast<int>(((a >> 14) & 4095u) + 1);
    if (level == 1) c.l1d = bytes;
    if (level == 2) c.l2 = bytes;
    if (level == 3) {
      c.l3 = bytes;
      c.l3_sharing = sharing;
    }
    any = true;
  }
  return any;
#else
  (void)c;
  return false;
#endif
}

int64_t read_size(const std::string& path) {  // "32K" / "1024K" / "32M"
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return 0;
  char buf[64] = {0};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  if (!ok) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(buf, &end, 10);
  if (v <= 0) return 0;
  if (*end == 'K') return v * 1024;
  if (*end == 'M') return v * 1024 * 1024;
  return v;
}

bool caches_sysfs(Caches& c) {
  bool any = false;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    FILE* f = std::fopen((dir + "type").c_str(), "r");
    if (!f) break;
    char type[32] = {0};
    const bool ok = std::fgets(type, sizeof type, f) != nullptr;
    std::fclose(f);
    if (!ok || std::strncmp(type, "Instruction", 11) == 0) continue;
    const int64_t level = read_size(dir + "level"), bytes = read_size(dir + "size");
    if (bytes <= 0) continue;
    if (level == 1) c.l1d = bytes;
    if (level == 2) c.l2 = bytes;
    if (level == 3) c.l3 = bytes;
    any = true;
  }
  return any;
}

Caches detect_caches() {
  Caches c{32 * 1024, 1024 * 1024, 32 * 1024 * 1024, 1};
  if (!caches_cpuid(c)) caches_sysfs(c);
  // Keep the blocking sane whatever a hypervisor reports.
  if (c.l1d < 8 * 1024 || c.l1d > 1024 * 1024) c.l1d = 32 * 1024;
  if (c.l2 < 64 * 1024 || c.l2 > 64 * 1024 * 1024) c.l2 = 1024 * 1024;
  if (c.l3 < c.l2) c.l3 = c.l2;
  if (c.l3_sharing < 1) c.l3_sharing = 1;
  return c;
}

}  // namespace

const Caches& caches() {
  static const Caches c = detect_caches();
  return c;
}

}  // namespace pk::cpu
