// Helpers shared by the CPU attention and decode kernels (csrc/cpu/attention.cpp, decode.cpp):
// a vectorized exp2, an aligned scratch buffer, a 16-way transposed horizontal sum, and the work split
// and thread loop of the AVX2 / NEON decode.
// Header-only, no pybind11. AVX-512 helpers carry their own target attribute (see vec.h), so this
// header is safe in a portable build; call them only after checking features().avx512f.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/params.h"
#include "cpu/cpu.h"
#include "cpu/vec.h"

namespace pk::cpu::attn {

// log2(e): both kernels work in base 2 (scores pre-multiplied by scale*log2(e)), so the softmax
// needs exp2, whose range reduction is a plain round (no multiply by 1/ln2).
constexpr float kLog2e = 1.4426950408889634f;
// Attention calls below this many query-row x key x D steps (~4 MFLOP) run on one thread, on every tier: the
// measurements behind it are in attention.cpp (run_avx512).
constexpr int64_t kAttnParallelSteps = int64_t(1) << 20;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// KV heads whose packed K / V (head_bytes each) a call holds at a time, where it packs them before running their
// items (the portable, avx2 and neon attention; the avx512 tier packs into a ring of a few heads): as many as fit in
// half of the calling thread's kept scratch (scratch.h kKeepMax), at least one. Past the kept size the packs were a fresh allocation per call (its page
// faults at every call) and grew with the context without bound (1 GB at S 32768 H 32 D 128 fp32).
// The C++ harness (tools/cpu_harness/portable_harness.cpp) sets it to 1 byte to run every shape a head at a time.
constexpr int64_t kPackedHeadsBytes = int64_t(32) << 20;
inline std::atomic<int64_t>& packed_heads_bytes() {
  static std::atomic<int64_t> bytes{kPackedHeadsBytes};
  return bytes;
}
inline int64_t heads_per_pack(int64_t head_bytes, int64_t heads) {
  const int64_t budget = packed_heads_bytes().load(std::memory_order_relaxed);
  return std::clamp<int64_t>(budget / std::max<int64_t>(head_bytes, 1), 1, std::max<int64_t>(heads, 1));
}

// Under a causal mask every tier multiplies the V rows of a diagonal tile by the P of rows that must not see them,
// where P is exactly 0; a non-finite value in such a V row reaches those rows as 0 * inf or 0 * NaN. The kernels note
// a NaN in the rows they store, and attention() then recomputes the rows it may have reached with their own keys
// only (attention.cpp, exact_causal_rows). One per call, shared by its threads.
struct NanSeen {
  std::atomic<bool> any{false};
  void note(bool nan) {
    if (nan) any.store(true, std::memory_order_relaxed);
  }
};

// 64-byte aligned scratch memory (one zmm per cache line); zero-filled when asked.
class AlignedBuf {
 public:
  AlignedBuf() = default;
  explicit AlignedBuf(size_t bytes, bool zero = false) {
    const size_t n = (bytes + 63) / 64 * 64;
    p_ = n ? std::aligned_alloc(64, n) : nullptr;
    if (n && !p_) throw std::bad_alloc();
    if (zero && p_) std::memset(p_, 0, n);
  }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  ~AlignedBuf() { std::free(p_); }
  template <typename T> T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
};

// The work of one decode call on `max_threads` threads (the AVX2 and NEON decode tiers): items are
// (sequence, kv head, context chunk), numbered u * nchunk + c with unit u = b * Hkv + kv head. The context
// is split into chunks (a multiple of `tile` tokens, at least min_chunk; their partials merged afterwards)
// only when there are fewer than 2 units per thread, into ~4 items per thread; a call that reads less than
// min_parallel_bytes of K and V runs on one thread.
// heads_per_unit kv heads of a sequence form one unit (1 or Hkv): its items then walk those heads.
// prefetch_l1: where the kernels' K/V prefetches go (cpu.h stream_prefetch_l1 for this call's g; read here,
// outside the parallel region, because a bad PYKERNELS_CPU_PREFETCH throws).
struct DecodeSplit {
  int threads;
  int64_t units, chunk, nchunk;
  std::vector<int64_t> items;
  int64_t heads_per_unit = 1;
  bool prefetch_l1 = false;
  bool prefetch_near = false;  // cpu.h stream_prefetch_near(), read with prefetch_l1
  int64_t prefetch_bytes = kPrefetchDistanceDefault;  // cpu.h stream_prefetch_distance(), likewise
};
inline DecodeSplit split_decode(const DecodeParams& p, int64_t elem_bytes, int64_t tile, int max_threads,
                                int64_t min_chunk = 256, int64_t min_parallel_bytes = 256 * 1024,
                                int64_t heads_per_unit = 1) {
  DecodeSplit s{max_threads, p.B * p.Hkv / heads_per_unit, 0, 1, {}, heads_per_unit,
                stream_prefetch_l1(p.Hq / p.Hkv), stream_prefetch_near(), stream_prefetch_distance()};
  int64_t maxlen = 0, tokens = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    maxlen = std::max<int64_t>(maxlen, p.context_lens[b]);
    tokens += p.context_lens[b];
  }
  if (2 * tokens * p.Hkv * p.D * elem_bytes < min_parallel_bytes) s.threads = 1;
  s.chunk = maxlen;
  if (s.units < 2 * s.threads) {
    const int64_t want = (4 * s.threads + s.units - 1) / s.units;
    s.chunk = std::max(min_chunk, round_up((maxlen + want - 1) / want, tile));
    s.nchunk = (maxlen + s.chunk - 1) / s.chunk;
  }
  s.items.reserve(static_cast<size_t>(s.units * s.nchunk));
  for (int64_t u = 0; u < s.units; ++u)
    for (int64_t c = 0; c < (p.context_lens[u * heads_per_unit / p.Hkv] + s.chunk - 1) / s.chunk; ++c)
      s.items.push_back(u * s.nchunk + c);
  return s;
}

// Row pointers of tokens [j0, j0 + nj) of (sequence b, kv head hk): one block-table lookup and one
// division per run of rows inside a block, not per token (two 64-bit divisions per row would cost
// ~40-80 cycles per 512-byte row, a sizeable part of the time a core has per row at DRAM speed).
template <class T>
inline void tile_rows(const DecodeParams& p, const T* base, int64_t b, int64_t hk, int64_t j0, int64_t nj, const T** out) {
  for (int64_t t = j0; t < j0 + nj;) {
    const int64_t blk = decode_block(p, b, t), r = t % p.block_size;
    const int64_t run = std::min(p.block_size - r, j0 + nj - t);
    const T* row = base + ((blk * p.Hkv + hk) * p.block_size + r) * p.D;
    for (int64_t i = 0; i < run; ++i) out[t - j0 + i] = row + i * p.D;
    t += run;
  }
}

// Where this thread's K/V prefetches go (prefetch_stream's l1); run_decode_split sets it from the split.
inline thread_local bool t_prefetch_l1 = false;
// Whether this thread's decode also prefetches each K/V line a second time, nearer (decode.cpp pf_near_rows).
inline thread_local bool t_prefetch_near = false;
// How far ahead this thread's decode prefetches (cpu.h stream_prefetch_distance, bytes).
inline thread_local int64_t t_prefetch_bytes = kPrefetchDistanceDefault;

// Merges the chunk partials of one (sequence, kv head) for its g query heads (log-sum-exp, base 2; the AVX2 and
// portable decode): part [nc][g][stride] holds each chunk's unnormalized o (D floats) and its m and l at
// stride - 2 and stride - 1. out(h, acc, L) receives head h's merged sums (acc, D floats of the caller's
// scratch) and their total weight L; exp2f is the tier's scalar 2^x.
template <class Exp2, class Out>
inline void merge_partials(const float* part, int64_t nc, int64_t g, int64_t stride, int64_t D, float* acc, Exp2 exp2f,
                           Out out) {
  for (int64_t h = 0; h < g; ++h) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < nc; ++c) M = std::max(M, part[(c * g + h) * stride + stride - 2]);
    float L = 0.f;
    std::fill(acc, acc + D, 0.f);
    for (int64_t c = 0; c < nc; ++c) {
      const float* r = part + (c * g + h) * stride;
      const float w = exp2f(r[stride - 2] - M);
      L += w * r[stride - 1];
      for (int64_t d = 0; d < D; ++d) acc[d] += w * r[d];
    }
    out(h, acc, L);
  }
}

// Runs a decode split on its threads (OpenMP, dynamic schedule): item(b, first kv head, chunk, scratch) for
// every item (its unit's w.heads_per_unit kv heads), then, when the context was split, merge(b, kv head,
// scratch) for every (sequence, kv head). Each thread's scratch is make_scratch()'s, made once per thread
// inside the parallel region.
template <class Make, class Item, class Merge>
void run_decode_split(const DecodeSplit& w, int64_t Hkv, Make make_scratch, Item item, Merge merge) {
  const int64_t nitems = static_cast<int64_t>(w.items.size());
#pragma omp parallel num_threads(w.threads) if (w.threads > 1)
  {
    t_prefetch_l1 = w.prefetch_l1;
    t_prefetch_near = w.prefetch_near;
    t_prefetch_bytes = w.prefetch_bytes;
    auto sc = make_scratch();
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nitems; ++i) {
      const int64_t bh = w.items[i] / w.nchunk * w.heads_per_unit;  // first (sequence, kv head) of the unit
      item(bh / Hkv, bh % Hkv, w.items[i] % w.nchunk, sc);
    }
    if (w.nchunk > 1) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < w.units * w.heads_per_unit; ++bh) merge(bh / Hkv, bh % Hkv, sc);
    }
  }
}

#define PK_ALWAYS_INLINE inline __attribute__((always_inline))

// One software prefetch of a streamed K/V line, to L1 or L2 as this thread's decode call chose (l1: the
// thread's t_prefetch_l1, from the split). The caller reads t_prefetch_l1 once per item and passes it down:
// in the shared library every thread-local read is a __tls_get_addr call, and one left beside a prefetch in a
// loop (with the vector registers spilled around it) cost the AVX2 decode ~40% (notes/cpu_decode.md).
// __builtin_prefetch is what _mm_prefetch expands to (locality 3: prefetcht0, 2: prefetcht1 on x86), so the
// portable decode uses it too.
PK_ALWAYS_INLINE void prefetch_stream(const void* p, bool l1) {
  if (l1)
    __builtin_prefetch(p, 0, 3);
  else
    __builtin_prefetch(p, 0, 2);
}

#if defined(__x86_64__) || defined(_M_X64)

// Denormals flushed to zero (MXCSR FTZ + DAZ) on this thread while it lives, restored after: padding
// lanes and masked keys of the softmax can hold tiny or stale values, and an AVX-512 FMA or vscalefps
// that meets a denormal takes a microcode assist of ~100+ cycles on Sapphire Rapids. Results change only
// where a value below 2^-126 would have been kept (a probability 2^-126 below the row's maximum).
class FlushDenormals {
 public:
  FlushDenormals() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(csr_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned csr_;
};

// 2^x for 16 lanes. Range reduction x = n + f, f in [-0.5, 0.5]; 2^f by its degree-6 Taylor
// polynomial (truncation error (ln2/2)^7/7! = 1.2e-7, i.e. ~1 ulp of fp32); 2^n applied with
// vscalefps, which handles the exponent without integer tricks. x < -126 gives exactly 0 (so -inf, the
// masked score, gives 0), by a zero-masked vscalefps: a denormal result (2^-127 .. 2^-149) takes a
// microcode assist of ~100+ cycles per instruction on Sapphire Rapids, and at S = 16 three of four keys
// of a 64-key tile are masked: attention S16 D64 spent 70% of its time there (0.10 ms for 16 heads).
// NaN stays NaN (vmaxps returns its second operand on NaN; an unordered compare keeps the lane).
PK_AVX512 PK_ALWAYS_INLINE __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  x = _mm512_min_ps(_mm512_set1_ps(128.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// 2^x for x <= 0 only (or -inf, NaN): the softmax's exponents, a score minus a maximum at least as large
// (lanes a caller masks afterwards may hold anything).
// The range reduction of exp2_ps without its clamps: a lane below -126 (-inf included, whose range
// reduction is NaN) gives exactly 0 by the zero-masked vscalefps, a NaN stays NaN. The polynomial is fitted
// to 2^f on [-1/2, 1/2] for relative error (Lawson-weighted least squares): Deg = 5, max 2.0e-7 evaluated in
// fp32 (exp2_ps' degree-6 Taylor polynomial: 2.4e-7), for fp32 probabilities; Deg = 3, max 7.5e-5, 27x below
// the half-ulp 2^-9 of the bf16 rounding that bf16 probabilities or outputs then go through. 8 or 6
// operations against exp2_ps' 12: the softmax was ~17% of bf16 attention on a Zen 5 core, where vdpbf16ps
// runs at twice the FMA rate.
template <int Deg>
PK_AVX512 PK_ALWAYS_INLINE __m512 exp2_neg(__m512 x) {
  static_assert(Deg == 3 || Deg == 5, "fitted polynomials: degree 3 (bf16) or 5 (fp32)");
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (Deg == 5) {
    p = _mm512_set1_ps(1.330882078036666e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67151764780283e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550582334399223e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242426872253e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470632553101e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  } else {
    p = _mm512_set1_ps(0.05517132207751274f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24261054396629333f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932609677314758f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999281167984009f));
  }
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Scalar 2^x through the vector code: no libm call, so the 16-32 live zmm accumulators around it
// are not spilled (a call clobbers every vector register).
PK_AVX512 PK_ALWAYS_INLINE float exp2_ss(float x) { return _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(x))); }

// Keeps v in a register: GCC otherwise folds a load that feeds several FMAs into each of them as a
// memory operand (4x the loads; the PV loop then runs at the load ports' pace, not the FMA pipe's).
#define PK_PIN(v) __asm__("" : "+v"(v))

// The transposed reductions (hsum16, reduce16, reduce_rows4) live in vec.h, shared with the GEMM's dot path.
using vec::AddOp;
using vec::hsum16;
using vec::MaxOp;
using vec::reduce16;
using vec::reduce_rows4;

#endif

// f(std::integral_constant<int, Dk>{}) with Dk = D rounded up to a multiple of Step, for D in 1..256: the head dim a
// tier's attention kernel runs at, its rows zero-padded past D (cpu.h tier_attention_head_dim; the AVX-512, AVX2 and
// NEON kernels take Step 16, the AMX one 32). Dk = Step, 2 Step, .. 256 are instantiated.
template <int Step, int Dk = Step, class F> decltype(auto) with_head_dim(int64_t D, F&& f) {
  static_assert(256 % Step == 0, "head dims up to 256 in whole steps");
  if constexpr (Dk < 256) {
    if (D > Dk) return with_head_dim<Step, Dk + Step>(D, std::forward<F>(f));
  }
  if (D < 1 || D > Dk)
    throw std::invalid_argument("the tiers' attention kernels take head dims 1 to 256, got " + std::to_string(D));
  return f(std::integral_constant<int, Dk>{});
}

}  // namespace pk::cpu::attn
