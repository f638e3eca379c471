// Entry points of the CPU kernels (csrc/cpu/*.cpp). Inputs were checked by csrc/bindings.cpp;
// unsupported dtypes or head dims throw std::invalid_argument (a ValueError in Python).
#pragma once
#include "common/params.h"

#include <string>

namespace pk::cpu {

struct Features {
  bool avx2_fma;
  bool avx512f;      // F + BW + VL + DQ
  bool avx512_bf16;
  bool amx_bf16;     // CPUID says so and the OS granted the tile-data permission
  bool neon;         // aarch64 Advanced SIMD (part of every ARMv8-A CPU)
};
const Features& features();  // what the CPU (and OS) can run

// ISA tiers, chosen at run time: the best the CPU runs, or the one PYKERNELS_CPU_ISA (read when the
// extension loads) or set_isa() asked for, so that one machine can test and time every tier.
//   amx       avx512 plus AMX-BF16 tiles for bf16 GEMM and attention: csrc/cpu/*_amx.cpp
//   avx512    AVX-512F/BW/VL/DQ (+ AVX512_BF16 when present): csrc/cpu/{gemm,attention,decode}.cpp
//   avx2      AVX2 + FMA micro-kernels: csrc/cpu/*_avx2.cpp (built with -mavx2 -mfma -mno-avx512f)
//   neon      aarch64 builds: NEON (Advanced SIMD) micro-kernels: csrc/cpu/*_neon.cpp and gemm.cpp's F32Neon
//   portable  plain C++, vectorized by the compiler for the build's target
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3, neon = 4 };
inline constexpr Isa kIsas[] = {Isa::amx, Isa::avx512, Isa::avx2, Isa::neon, Isa::portable};  // best first
const char* isa_name(Isa t);
bool parse_isa(const char* name, Isa* out);   // false for an unknown name
bool isa_supported(Isa t);
Isa active_isa();
void set_isa(Isa t);                          // std::invalid_argument if the CPU cannot run it
// features() restricted to the active tier: the kernels dispatch on this.
Features enabled();

// Whether vdpbf16ps (two bf16 multiply-adds per fp32 lane) beats widening bf16 to fp32 and vfmadd231ps on
// this core: the bf16 paths of the avx512 tier that do many multiply-adds per byte (packed GEMM,
// attention, and decode, whose GQA rows reuse each K/V element for several heads: on Sapphire Rapids
// B8 Hkv8 widened read at 61-72% of a read loop against 55-69% with vdpbf16ps) ask this; the small-M GEMM
// paths (one multiply-add per weight byte or so) use vdpbf16ps wherever it exists. Zen 4: vdpbf16ps
// 64 FLOP/cycle against 32 for the FMA; Sapphire Rapids: 29 against 59. Decided once per process by
// timing both probe loops on one thread for a few milliseconds (probes.cpp), unless
// PYKERNELS_BF16_DOT=on|off (read once; anything else throws std::invalid_argument) says so.
bool bf16_dot_pays();
const char* bf16_dot_source();  // "measured", "PYKERNELS_BF16_DOT", "no AVX512_BF16" or a default
// The active tier has AVX512_BF16 and vdpbf16ps pays on this core: what the bf16 paths above branch on.
inline bool use_bf16_dot() { return enabled().avx512_bf16 && bf16_dot_pays(); }

// Whether a zmm FMA runs at twice the FLOP rate of a ymm one on this core (two full-width 512-bit FMA
// pipes: Sapphire Rapids 59 against 30 FLOP/cycle) rather than at the same rate (Zen 4 splits it into two
// 256-bit halves). The small-M GEMM's direct path (gemm.cpp) then stays memory-bound up to 8 rows instead
// of 4. Decided once per process by timing the two probe loops on one thread for a few milliseconds.
bool zmm_fma_full_width();
const char* zmm_fma_source();  // "measured", "no AVX-512" or a default

// Where the decode kernels' software prefetches of the streamed K/V rows land: L2 (prefetcht1) or L1
// (prefetcht0), for all calls or by g (query heads per kv head): l1_ungrouped = L1 for g = 1 only,
// l1_grouped = L1 for g > 1 only. Measured per CPU (notes/cpu_decode.md: prepared calls in Python, B8 Hq32
// L4096 D128, L1 and L2 in turns with the native read in the same rounds): on Zen 5 (AMD family 26) L1 reads
// the g = 1 rows (Hkv 32) 2-18% faster on 1 and 2 threads (four runs), but the g = 4 rows (Hkv 8) 0-12%
// slower; on Sapphire Rapids L2 was the better (bf16 Hkv 8 18.8-20.6 GB/s vs 17.7-18.6 with L1), and on Zen 4
// (an earlier version of the kernel) too (fp32 Hkv 32 19.7 vs 12.2). So the default is l1_ungrouped on AMD
// family >= 26 and L2 elsewhere; `pykernels tune` measures the choices on the machine and caches the best
// (applied through set_stream_prefetch when the Python package loads the extension);
// PYKERNELS_CPU_PREFETCH=l1|l2|l1-ungrouped|l1-grouped|auto (read once; anything else throws
// std::invalid_argument) or set_stream_prefetch() overrides it. Each decode call reads it when it splits
// its work.
enum class PrefetchLevel : int { l2 = 0, l1 = 1, l1_ungrouped = 2, l1_grouped = 3 };
PrefetchLevel stream_prefetch();
const char* stream_prefetch_name(PrefetchLevel l);  // "l2" / "l1" / "l1-ungrouped" / "l1-grouped"
bool parse_stream_prefetch(const char* name, PrefetchLevel* out);  // false for an unknown name
std::string stream_prefetch_source();  // "PYKERNELS_CPU_PREFETCH", the setter's source, or the default's reason
void set_stream_prefetch(PrefetchLevel l, const char* source = nullptr);  // source: "set_stream_prefetch" if null
// A second software prefetch of each streamed K/V line, into L1 at a shorter distance than the first one
// (decode.cpp pf_near_rows): on by default on AMD family >= 26, where it was measured (notes/cpu_decode.md,
// thirteenth session), off elsewhere unless `pykernels tune` finds it pays; PYKERNELS_CPU_PREFETCH_NEAR=on|off|auto
// (read once; anything else throws std::invalid_argument) or set_stream_prefetch_near() overrides it.
bool stream_prefetch_near();
std::string stream_prefetch_near_source();
void set_stream_prefetch_near(bool on, const char* source = nullptr);
// How far ahead of the row it reads the decode kernel prefetches each K/V stream, in bytes (16 KB by default,
// measured on Zen 4 and Zen 5; the near prefetch goes half as far): a multiple of 1024 in
// [kPrefetchDistanceMin, kPrefetchDistanceMax], in rows clamped to 16..128 (decode.cpp pf_rows).
// `pykernels tune` measures it per machine; PYKERNELS_CPU_PREFETCH_DISTANCE=<bytes>|auto or
// set_stream_prefetch_distance() (std::invalid_argument outside the range) overrides it.
constexpr int64_t kPrefetchDistanceMin = 1024, kPrefetchDistanceMax = 64 * 1024, kPrefetchDistanceDefault = 16 * 1024;
bool prefetch_distance_ok(int64_t bytes);
int64_t stream_prefetch_distance();
std::string stream_prefetch_distance_source();
void set_stream_prefetch_distance(int64_t bytes, const char* source = nullptr);
// Rows of B a GEMV-like product (M = 1, B stored [K, N], gemm.cpp's direct path) reads per step, i.e. the
// streams per item: 4 or 8. Zen 5 (C++ driver, K = N = 4096, alternated 4x): 4 rows read 1 thread fp32 36-40 ->
// 42-45 GB/s, bf16 36-38 -> 39-41, 2 threads bf16 +7% in three of four runs, fp32 level; from M = 2 on, 8 rows
// stay ahead (the partial's loads and stores amortized over more rows). Default 4 on AMD family >= 26, 8
// elsewhere (measured there with 8); `pykernels tune` measures it per machine; PYKERNELS_CPU_GEMV_STREAMS=4|8|auto
// (read once; anything else throws std::invalid_argument) or set_gemv_streams() overrides it.
int gemv_streams();
// The GEMV-like direct paths (gemm.cpp direct_steps, gemm_avx2.cpp direct_block) read an item's rows of at most
// this many bytes as streams of consecutive rows; longer rows already make long streams and keep consecutive
// rows per step.
constexpr int64_t kSplitRowBytes = 16 * 1024;
std::string gemv_streams_source();
void set_gemv_streams(int rows, const char* source = nullptr);  // 4 or 8, else std::invalid_argument
// Tokens per step of one kv head of the AVX-512 decode on a paged cache (decode.cpp item: steps of this many
// tokens, kv heads inner, so a step reads step / block_size blocks of one head and then the same blocks of the
// next head): 16, 32, 64 or 128, raised to a whole block (up to 128) where a block holds more rows. Shorter steps
// read each block's heads as fewer, longer runs (fewer streams at once: 2 x step / block_size per head, K and V)
// at a higher fixed cost per step (softmax reductions, P.V accumulators loaded and stored). Zen 4 (family 25,
// notes/cpu_decode.md, twenty-eighth session; B8 Hq32 L4096 D128 paged16, 2 threads, in turns in one process,
// three runs): 32 read the Hkv 8 rows 5-11% faster than 128 (fp32 and bf16) and bf16 Hkv 32 6-9%, fp32 Hkv 32
// level. Zen 5 (twelfth session, an earlier kernel) read 32-row steps no faster than 64 or 128. Default 32 on AMD
// family 25, 128 elsewhere; `pykernels tune` measures it per machine; PYKERNELS_CPU_PAGED_STEP=16|32|64|128|auto
// (read once; anything else throws std::invalid_argument) or set_paged_step() overrides it. The AVX2 and
// portable tiers step 32 tokens on every cache.
bool paged_step_ok(int64_t tokens);  // 16, 32, 64 or 128
int64_t paged_step();
std::string paged_step_source();
void set_paged_step(int64_t tokens, const char* source = nullptr);  // else std::invalid_argument
// Whether a decode with g query heads per kv head prefetches into L1 under stream_prefetch().
bool stream_prefetch_l1(int64_t g);

// Cache sizes per core in bytes (data/unified), from CPUID leaf 4 (Intel) / 0x8000001D (AMD) or
// sysfs; 32 KB / 1 MB / 32 MB when neither answers. l3 is the whole shared cache.
struct Caches {
  int64_t l1d, l2, l3;
  int l3_sharing;  // logical CPUs sharing the L3 (>= 1)
};
const Caches& caches();

void gemm(const GemmParams& p);
void attention(const AttentionParams& p);
void decode(const DecodeParams& p);
// Head dims the tiers' own kernels take: attention any D up to 256 (the AVX-512, AVX2 and NEON kernels run at D
// rounded up to 16, the AMX bf16 kernel at D rounded up to 32, attn::with_head_dim, on rows zero-padded past D);
// decode 64 and 128 (at 256 the avx512 tier's bf16 decode measured no faster than the portable one: its query rows
// no longer fit registers for two heads). A call with any other D runs the portable kernel of its family
// (attention.cpp / decode.cpp dispatch).
constexpr bool tier_attention_head_dim(int64_t D) { return D >= 1 && D <= 256; }
constexpr bool tier_decode_head_dim(int64_t D) { return D == 64 || D == 128; }
// The tier whose code runs a decode of head dim D / an attention of head dim D and dtype dt: the active tier, or
// portable (above).
Isa decode_isa(int64_t D);
Isa attention_isa(int64_t D, DType dt);

int max_threads();

// AVX2 tier entry points (csrc/cpu/*_avx2.cpp); callers check enabled().avx2_fma first.
void gemm_avx2(const GemmParams& p);
bool attention_avx2(const AttentionParams& p);  // true: a stored output row holds a NaN
void decode_avx2(const DecodeParams& p);

// NEON tier (aarch64 builds; csrc/cpu/*_neon.cpp, empty elsewhere); callers check enabled().neon. The GEMM's
// NEON micro-kernel is a policy of gemm.cpp's drivers (F32Neon there).
bool attention_neon(const AttentionParams& p);  // D 64 or 128, fp32 and bf16; true as attention_avx2
void decode_neon(const DecodeParams& p);        // D 64 or 128, fp32 and bf16

// AMX tier (csrc/cpu/*_amx.cpp); callers check enabled().amx_bf16.
void gemm_amx(const GemmParams& p);            // bf16 GEMM, either B layout (gemm_amx.cpp)
bool attention_amx(const AttentionParams& p);  // bf16 flash attention, D 1 to 256; true as attention_avx2

}  // namespace pk::cpu
