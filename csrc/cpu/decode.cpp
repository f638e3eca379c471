// Decode attention on CPUs: one query token per sequence against a KV cache (contiguous or paged),
// o = softmax(scale * q K^T over the first context_lens[b] tokens) V. Memory-bound: every K/V row of
// the context is read exactly once, so the goal is DRAM speed.
//
// Work item = (sequence b, kv heads, context chunk): one kv head on a contiguous cache, all of them on a
// paged one (a block holds every head's rows back to back, so walking the heads inside each block reads
// long runs). An item computes all g = Hq/Hkv query heads of each GQA group, so each K/V row is fetched
// from memory once and reused g times from L1. Items run over OpenMP threads (dynamic). When the items
// alone cannot keep every thread busy (fewer than 2 per thread), each sequence's context is split into
// chunks; every chunk leaves a partial (running max m, sum l, unnormalized o) and a second pass merges
// them (log-sum-exp, base 2). Per item, steps of kT = 128 tokens of one kv head (on a paged cache cpu.h
// paged_step(), 16..128, kv heads inner):
//   row offsets    one per token, this step's and the next step's (page by page through the table);
//                  the loops below prefetch the row ~16 KB ahead of the one they read (see pf_rows)
//   S = q K^T      g a multiple of 4: four heads in the lanes of one vector, each 16-byte piece of a
//                  K row broadcast to them, 4-lane sums (scores_quad16); otherwise per head and 16
//                  tokens: 16 dot vectors (fp32 FMA, or vdpbf16ps on bf16 pairs), reduced by one
//                  transposed 16-way horizontal sum (attn_common.h)
//   online softmax base 2 (q, or the scores, carry scale * log2 e), mask past the context; the running
//                  max moves only when a score passes it by more than 2^8 (lazy rescaling, softmax_tile)
//   o = a o + P V  fp32 accumulators in registers for up to 4 heads x 64 columns (fp32 with one or two heads:
//                  whole rows of D = 128, one pass over each V row); bf16 V widened in
//                  registers: one 64-byte load gives the even columns (32-bit shift) and the odd ones
//                  (mask), accumulated de-interleaved and re-interleaved once at the end.
// Paths, chosen at run time from CPUID (cpu_features.cpp): fp32 (AVX-512F); bf16 with AVX512_BF16
// (vdpbf16ps for q.K, exact products); bf16 with AVX-512F only (K widened like V); no AVX-512 or a
// head dim other than 64/128: the portable path (run_portable: the target's vectors through GCC / Clang vector
// extensions, all g heads per K/V row). aarch64 (tier neon),
// D 64/128: decode_neon.cpp (NEON, heads in the lanes for q.K; fp32 fmla, bf16 widened in registers).
// Rows past a sequence's length (and blocks it does not own) are never read, so whatever they hold
// (NaN included) cannot reach the output. Inputs were checked by csrc/bindings.cpp (context_lens in
// 1..capacity, block-table entries in range). All index arithmetic is 64-bit.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/attn_common.h"
#include "cpu/cpu.h"
#include "cpu/scalar.h"
#include "cpu/vec.h"
#include "cpu/vec_portable.h"

namespace pk::cpu {
namespace {

using attn::AlignedBuf;

// Tokens per tile (step): 128 scores per head = 8 zmm; the tile's K and V rows (128 x 512 B each at
// D = 128 fp32 = 128 KB) stay in L2 between the q.K pass and the P.V pass. 128 rather than 64: half the
// per-step costs (softmax reductions, P.V accumulators loaded and stored). Zen 5, 1 thread, Python prepared
// calls with the native read in the same rounds (B8 Hq32 L4096 D128, two runs): the Hkv 32 (g = 1) rows
// +3-7 points of the read, the others level; in L2 fp32 Hkv 8 58 -> 65 GB/s (notes/cpu_decode.md).
constexpr int64_t kT = 128;
// Heads per P.V register block: 4 heads x 4 zmm (64 columns) = 16 accumulators + 4 V + 1 broadcast.
constexpr int kG = 4;
// Shortest context chunk worth a partial: the merge costs ~g*D*3 flops per chunk, 256 tokens cost
// 256*g*D*4; below that the split buys no balance worth having.
constexpr int64_t kMinChunk = 256;
// Below this many K/V bytes, one thread: a fork/join (~5-20 us on a shared VM) costs more than it saves.
constexpr int64_t kMinParallelBytes = 256 * 1024;
static_assert(kT % 16 == 0 && kT / 16 <= 8, "scores of a tile are kT/16 zmm per head");
static_assert(kMinChunk % kT == 0, "chunks are whole tiles");

enum class Kind { f32, bf16_dp, bf16_w };

struct Ctx {
  const DecodeParams* p;
  int64_t g, chunk;  // heads per kv head; tokens per chunk
  float c;           // scale * log2(e)
  float* part;       // partials [B*Hkv][nchunk][g][D + 16] (o[D], m, l), or null
  int64_t nchunk;
  int64_t st;  // tokens per step (kT, or cpu.h paged_step() on a paged cache)
};

// Element pointer of row (token t, kv head hk) of sequence b in cache `base`.
template <typename T>
inline const T* row_ptr(const DecodeParams& p, const T* base, int64_t b, int64_t hk, int64_t t) {
  const int64_t blk = decode_block(p, b, t);
  return base + ((blk * p.Hkv + hk) * p.block_size + t % p.block_size) * p.D;
}

// Row pointers of tokens [t0, t0 + n) of (b, hk) for both caches (the offset into K and V is the same).
// Walks page by page: one table look-up per page, not per token.
inline void tile_rows(const DecodeParams& p, int64_t b, int64_t hk, int64_t t0, int64_t n, int64_t es,
                      int64_t* off) {
  const int64_t bs = p.block_size, rowb = p.D * es;
  int64_t j = 0;
  while (j < n) {
    const int64_t t = t0 + j, r = t % bs, run = std::min(n - j, bs - r);
    const int64_t base = ((decode_block(p, b, t) * p.Hkv + hk) * bs + r) * rowb;
    for (int64_t i = 0; i < run; ++i) off[j + i] = base + i * rowb;
    j += run;
  }
}

#if defined(__x86_64__)

// ---- q . K ---------------------------------------------------------------------------------------

// zmm registers that hold one prepared query row: fp32 and bf16_w (K widened) D/16, bf16_dp D/32.
template <Kind KD, int D>
constexpr int q_regs() {
  return KD == Kind::bf16_dp ? D / 32 : D / 16;
}
// Heads whose query rows stay in registers (<= 16 zmm) while each K row is loaded once for all of them:
// without this, g = 4 loads every K row 4 times and every q row once per token, and the q.K loop is
// bound by the loads (measured, fp32 g = 4 in L2: 24 GB/s per thread before).
template <Kind KD, int D>
constexpr int heads_per_pass() {
  return std::clamp(16 / q_regs<KD, D>(), 1, 4);
}

// Software prefetch, row by row at a fixed distance: the q.K loop prefetches the K row
// attn::t_prefetch_bytes ahead of the one it reads (cpu.h stream_prefetch_distance: 16 KB unless tuned or
// set), the P.V loop the V row, across tile (and kv-head step) boundaries, so that much per stream is always
// in flight while the core computes (the hardware prefetchers lose the stream at every 4 KB page of a paged
// cache and at every K/V switch). Measured, B=8 Hq=Hkv=32 L=4096 fp32 on 1 thread (Zen 4): 12.6 GB/s with a
// burst per tile, 19.7 with this (notes/cpu_decode.md). Into L2 or L1 as cpu.h stream_prefetch() says for
// this CPU (L2 on Sapphire Rapids and Zen 4, L1 on Zen 5). In rows: 16..kT (the row offsets reach kT past a
// step: `off` in item()). item() reads it once (Pf) and hands it to the loops.
template <int D, int64_t ES>
PK_ALWAYS_INLINE int64_t pf_rows() {
  return std::clamp<int64_t>(attn::t_prefetch_bytes / (D * ES), 16, kT);
}
// Where cpu.h stream_prefetch_near() says (AMD family >= 26), each line is prefetched a second time, into L1,
// half as far ahead (8 KB at the default distance). Zen 5, B8 Hq32 L4096 D128, Python prepared calls with the
// second prefetch off and on in turns, each paired with the native read of its round: +6 to +9 points of the
// read on all eight rows on 1 thread, +1 to +9 in all sixteen cells of two 2-thread runs; decode harness, 1
// thread, alternated 3x: fp32 Hkv 8 contiguous 26.8 -> 29.3 GB/s, bf16 Hkv 32 22.4 -> 25.7. A second prefetch
// at 4 KB did about as well, one prefetch at 4 or 8 KB alone no better than at 16 KB (notes/cpu_decode.md,
// thirteenth session).
template <int D, int64_t ES>
PK_ALWAYS_INLINE int64_t pf_near_rows() {
  return std::clamp<int64_t>(attn::t_prefetch_bytes / 2 / (D * ES), 2, pf_rows<D, ES>());
}
// An item's prefetch distances in rows (pf_rows, pf_near_rows) and whether the near prefetch runs
// (attn::t_prefetch_near): read from this thread's decode call once per item.
struct Pf {
  int64_t far, near;
  bool with_near;
};
template <int D, int64_t ES>
Pf item_pf() {
  return {pf_rows<D, ES>(), pf_near_rows<D, ES>(), attn::t_prefetch_near};
}

// Bytes [b0, b1) of a row (whole cache lines). The level is this thread's t_prefetch_l1, read here: GCC hoists
// that read out of the loops below (no __tls_get_addr call near a prefetch in the extension, checked with
// objdump); passing it down from item_pf as the AVX2 kernel does would not depend on that (not done: it changes
// the register allocation of the loops whose tables are committed; notes/cpu_decode.md).
PK_ALWAYS_INLINE void prefetch_part(const char* r, int64_t b0, int64_t b1) {
#pragma GCC unroll 8
  for (int64_t c = b0; c < b1; c += 64) attn::prefetch_stream(r + c, attn::t_prefetch_l1);
}
// The same, the second (near) prefetch, into L1. Its callers issue it only where the item has it (Pf).
PK_ALWAYS_INLINE void prefetch_part_near(const char* r, int64_t b0, int64_t b1) {
#pragma GCC unroll 8
  for (int64_t c = b0; c < b1; c += 64) _mm_prefetch(r + c, _MM_HINT_T0);
}

// Dot vectors (16 partial sums each) of HB query heads with m <= 16 K rows: t[h][jj] (16 floats each),
// zero for jj >= m. The first npre rows also prefetch bytes [pb0, pb1) of the row pf.far further on, the first
// nnear those of the row pf.near further on (the near prefetch).
template <Kind KD, int D, int HB>
PK_AVX512BF16 PK_ALWAYS_INLINE void dots(const float* q, const char* kb, const int64_t* off, int64_t m,
                                         int64_t npre, int64_t nnear, Pf pf, int64_t pb0, int64_t pb1, float* t) {
  constexpr int NC = q_regs<KD, D>();
  const int64_t *offd = off + pf.far, *offn = off + pf.near;  // the rows prefetched, far and near
  __m512 qr[HB][NC];
#pragma GCC unroll 4
  for (int h = 0; h < HB; ++h)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) qr[h][c] = _mm512_load_ps(q + h * D + 16 * c);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t jj = 0; jj < m; ++jj) {
    if (jj < npre) prefetch_part(kb + offd[jj], pb0, pb1);
    if (jj < nnear) prefetch_part_near(kb + offn[jj], pb0, pb1);
    const char* k = kb + off[jj];
    __m512 kr[NC];
    if constexpr (KD == Kind::f32) {
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) kr[c] = _mm512_loadu_ps(reinterpret_cast<const float*>(k) + 16 * c);
    } else if constexpr (KD == Kind::bf16_dp) {
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c) kr[c] = _mm512_castsi512_ps(_mm512_loadu_si512(k + 64 * c));
    } else {
      // q: per 32 columns, 16 even then 16 odd fp32 values; K widened the same way.
#pragma GCC unroll 4
      for (int c = 0; c < NC / 2; ++c) {
        const __m512i x = _mm512_loadu_si512(k + 64 * c);
        kr[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        kr[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
      }
    }
#pragma GCC unroll 4
    for (int h = 0; h < HB; ++h) {
      __m512 acc;
      if constexpr (KD == Kind::bf16_dp) {
        // Products of bf16 pairs are exact in fp32.
        acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)kr[0], (__m512bh)qr[h][0]);
#pragma GCC unroll 8
        for (int c = 1; c < NC; ++c) acc = _mm512_dpbf16_ps(acc, (__m512bh)kr[c], (__m512bh)qr[h][c]);
      } else {
        __m512 a0 = _mm512_mul_ps(qr[h][0], kr[0]), a1 = _mm512_mul_ps(qr[h][1], kr[1]);
#pragma GCC unroll 8
        for (int c = 2; c < NC; c += 2) {
          a0 = _mm512_fmadd_ps(qr[h][c], kr[c], a0);
          a1 = _mm512_fmadd_ps(qr[h][c + 1], kr[c + 1], a1);
        }
        acc = _mm512_add_ps(a0, a1);
      }
      _mm512_store_ps(t + (h * 16 + jj) * 16, acc);
    }
  }
  for (int64_t jj = m; jj < 16; ++jj)
#pragma GCC unroll 4
    for (int h = 0; h < HB; ++h) _mm512_store_ps(t + (h * 16 + jj) * 16, _mm512_setzero_ps());
}

// ---- q . K with the heads in the lanes (g a multiple of 4) ----------------------------------------
// Four query heads share each K row: lane 4h + j of chunk c holds element j of the 16-byte piece c of
// head h's prepared row (fp32: 4 values; bf16_dp: 4 bf16 pairs), and the 16-byte piece c of a K row is
// broadcast to the four 128-bit lanes. One FMA (or vdpbf16ps) then serves all four heads, and a
// token's four scores are sums of 4 lanes each: 16 tokens reduce in 12 adds + 32 shuffles (reduce4,
// then a 4x4 transpose of 128-bit blocks), against 4 x 45 operations and 64 stores + loads of the
// 16-way transposed sums the row-dot path needs (measured, that path spent ~20% of bf16 g = 4 in them).

// Whether a step's scores take this path (the query then also lives in Scratch::qq).
template <Kind KD>
inline bool use_quad(int64_t g) {
  return KD != Kind::bf16_w && g % 4 == 0;
}

// Chunks of 16 bytes in a prepared query row.
template <Kind KD, int D>
constexpr int quad_chunks() {
  return KD == Kind::f32 ? D / 4 : D / 8;
}

// Four vectors of (head, 4 partials) lanes for tokens t..t+3 -> one vector, lane 4h + i = score of
// head h, token t + i.
PK_AVX512 PK_ALWAYS_INLINE __m512 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_ps(c, d, 0x88), _mm512_shuffle_ps(c, d, 0xDD));
  return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x88), _mm512_shuffle_ps(ab, cd, 0xDD));
}

// Partial dot vectors of 8 K rows (pointers k[0..8)) with the quad's prepared query qq, reduced to
// two vectors of (head, token) lanes: r[0] tokens 0..3, r[1] tokens 4..7.
// Row i (< npre) also prefetches the lines of pf[i] in [pb0, pb1), one line per 4 chunks it reads, so the
// prefetches are spread over the loop.
template <Kind KD, int D>
PK_AVX512BF16 PK_ALWAYS_INLINE void dots_quad8(const float* qq, const char* const* k, const char* const* pf,
                                               int64_t npre, int64_t pb0, int64_t pb1, __m512* r) {
  constexpr int NCH = quad_chunks<KD, D>();
  __m512 acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  if constexpr (KD == Kind::f32) {
    // fp32: one 64-byte load per line of each row, its four 16-byte pieces broadcast in registers (vshuff32x4)
    // instead of four broadcast loads. Zen 5, decode harness, B8 Hq32 Hkv8 L4096 D128 fp32, alternated 5-6x in
    // four runs: contiguous 26.6-27.0 -> 29.0-29.4 GB/s on 1 thread, 36.8-43.2 -> 37.5-48.5 on 2; paged16 1-3%
    // lower on 1 thread, level on 2; in L2 +6-10%. On bf16 pairs the same was level (contiguous) or lost
    // (paged): they keep the broadcast loads (notes/cpu_decode.md, fifteenth session).
    static_assert(NCH % 4 == 0, "whole lines");
    for (int c = 0; c < NCH; c += 4) {
      const __m512 q0 = _mm512_load_ps(qq + 16 * c), q1 = _mm512_load_ps(qq + 16 * c + 16);
      const __m512 q2 = _mm512_load_ps(qq + 16 * c + 32), q3 = _mm512_load_ps(qq + 16 * c + 48);
      if (16 * c >= pb0 && 16 * c < pb1)
        for (int64_t i = 0; i < npre; ++i) attn::prefetch_stream(pf[i] + 16 * c, attn::t_prefetch_l1);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512 l = _mm512_loadu_ps(reinterpret_cast<const float*>(k[i] + 16 * c));
        acc[i] = _mm512_fmadd_ps(q0, _mm512_shuffle_f32x4(l, l, 0x00), acc[i]);
        acc[i] = _mm512_fmadd_ps(q1, _mm512_shuffle_f32x4(l, l, 0x55), acc[i]);
        acc[i] = _mm512_fmadd_ps(q2, _mm512_shuffle_f32x4(l, l, 0xAA), acc[i]);
        acc[i] = _mm512_fmadd_ps(q3, _mm512_shuffle_f32x4(l, l, 0xFF), acc[i]);
      }
    }
  } else {
#pragma GCC unroll 4
    for (int c = 0; c < NCH; ++c) {
      const __m512 qv = _mm512_load_ps(qq + 16 * c);
      if (c % 4 == 0 && 16 * c >= pb0 && 16 * c < pb1)
        for (int64_t i = 0; i < npre; ++i) attn::prefetch_stream(pf[i] + 16 * c, attn::t_prefetch_l1);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512i kv = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k[i] + 16 * c)));
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)kv, (__m512bh)qv);
      }
    }
  }
  r[0] = reduce4(acc[0], acc[1], acc[2], acc[3]);
  r[1] = reduce4(acc[4], acc[5], acc[6], acc[7]);
}

// Scores of the quad's 4 heads for m <= 16 K rows starting at off[0]: s[h * kT + 0..16) (times cs),
// -inf past m. Rows past m are read as row 0 (in the context) and masked. The first npre rows
// prefetch bytes [pb0, pb1) of the row pr.far further on; those of the rows pr.near further on (the first nnear)
// are prefetched again, near, before the dot products.
template <Kind KD, int D>
PK_AVX512BF16 PK_ALWAYS_INLINE void scores_quad16(const float* qq, const char* kb, const int64_t* off, int64_t m,
                                                  int64_t npre, int64_t nnear, Pf pr, int64_t pb0, int64_t pb1,
                                                  float cs, float* s) {
  const char* k[16];
  const char* pf[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) k[i] = kb + off[i < m ? i : 0];
  for (int64_t i = 0; i < npre; ++i) pf[i] = kb + off[i + pr.far];
  for (int64_t i = 0; i < nnear; ++i) prefetch_part_near(kb + off[i + pr.near], pb0, pb1);
  __m512 r[4];
  dots_quad8<KD, D>(qq, k, pf, std::min<int64_t>(npre, 8), pb0, pb1, r);
  dots_quad8<KD, D>(qq, k + 8, pf + 8, std::max<int64_t>(npre - 8, 0), pb0, pb1, r + 2);
  // 4x4 transpose of 128-bit blocks: block h of r[t] -> block t of head h's vector.
  const __m512 u0 = _mm512_shuffle_f32x4(r[0], r[1], 0x44), u1 = _mm512_shuffle_f32x4(r[0], r[1], 0xEE);
  const __m512 u2 = _mm512_shuffle_f32x4(r[2], r[3], 0x44), u3 = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
  const __m512 o[4] = {_mm512_shuffle_f32x4(u0, u2, 0x88), _mm512_shuffle_f32x4(u0, u2, 0xDD),
                       _mm512_shuffle_f32x4(u1, u3, 0x88), _mm512_shuffle_f32x4(u1, u3, 0xDD)};
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __mmask16 mk = vec::mask16(m);
#pragma GCC unroll 4
  for (int h = 0; h < 4; ++h) {
    __m512 v = o[h];
    if constexpr (KD == Kind::bf16_dp) v = _mm512_mul_ps(v, _mm512_set1_ps(cs));
    _mm512_store_ps(s + h * kT, _mm512_mask_mov_ps(ninf, mk, v));
  }
}

// Scores of the g heads for the n <= kT tokens of a step: s[h][0:16 ceil(n/16)] (base 2), -inf past n. 16 tokens at a
// time, heads_per_pass heads per pass over them, so those 16 K rows (8 KB at D = 128 fp32) are read
// from L1 by the later passes. The first pass prefetches the rows pf.far ahead (up to npf, the rows known).
template <Kind KD, int D>
PK_AVX512BF16 PK_ALWAYS_INLINE void scores(int64_t g, const float* q, const float* qq, const char* kb,
                                           const int64_t* off, int64_t n, int64_t npf, Pf pf, float c, float* s) {
  constexpr int HB = heads_per_pass<KD, D>();
  constexpr int64_t ES = KD == Kind::f32 ? 4 : 2;
  if (use_quad<KD>(g)) {  // heads in the lanes; each quad prefetches its share of a row
    const int64_t passes = g / 4;
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t m = std::min<int64_t>(16, n - j0), npre = std::clamp<int64_t>(npf - j0 - pf.far, 0, 16);
      const int64_t nnear = pf.with_near ? std::clamp<int64_t>(npf - j0 - pf.near, 0, 16) : 0;
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t pb0 = pass * D * ES / passes / 64 * 64, pb1 = (pass + 1) * D * ES / passes / 64 * 64;
        scores_quad16<KD, D>(qq + 4 * pass * D, kb, off + j0, m, npre, nnear, pf, pb0, pb1, c, s + 4 * pass * kT + j0);
      }
    }
    return;
  }
  alignas(64) float t[HB * 16 * 16];
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - j0);
    // Every pass over the 16 rows prefetches its share of the lines of the rows pf.far ahead, so the
    // prefetches are spread over the whole q.K loop.
    const int64_t npre = std::clamp<int64_t>(npf - j0 - pf.far, 0, 16), passes = g / HB + g % HB;
    const int64_t nnear = pf.with_near ? std::clamp<int64_t>(npf - j0 - pf.near, 0, 16) : 0;
    int64_t pass = 0;
    for (int64_t h0 = 0; h0 < g; ++pass) {
      const int64_t nh = std::min<int64_t>(HB, g - h0);
      const int64_t pb0 = pass * D * ES / passes / 64 * 64, pb1 = (pass + 1) * D * ES / passes / 64 * 64;
      if (nh == HB)
        dots<KD, D, HB>(q + h0 * D, kb, off + j0, m, npre, nnear, pf, pb0, pb1, t);
      else
        dots<KD, D, 1>(q + h0 * D, kb, off + j0, m, npre, nnear, pf, pb0, pb1, t);
      const int64_t done = nh == HB ? HB : 1;
      for (int64_t h = 0; h < done; ++h) {
        __m512 v = attn::hsum16(reinterpret_cast<const __m512*>(t + h * 256));
        if constexpr (KD == Kind::bf16_dp) v = _mm512_mul_ps(v, _mm512_set1_ps(c));
        _mm512_store_ps(s + (h0 + h) * kT + j0, _mm512_mask_mov_ps(ninf, vec::mask16(m), v));
      }
      h0 += done;
    }
  }
}

// Online softmax of one head over a step, with lazy rescaling: the reference max m moves only when a
// score exceeds it by more than kLazy (base 2), so p = 2^(s - m) <= 2^kLazy and, on almost every step
// after the first, no horizontal max, no exp of the rescale factor and no rescale happen. The running
// sum l is a vector of 16 partial sums (reduced once, at the end). s becomes the probabilities; returns
// the factor that rescales the old accumulators (1 when m did not move). Only the identity
// o / l = sum p V / sum p matters, and it holds for any m both were taken against; the partials of a
// split context carry their m to the merge. Measured, B=2 Hq=32 Hkv=8 L=512 bf16 paged16 in cache, 1
// thread: the fixed cost per (kv head, step) went from ~400 to ~290 cycles (notes/cpu_decode.md v7).
// nv: vectors of 16 scores that hold the step's tokens (the rest are not read by P.V).
constexpr float kLazy = 8.f;
PK_AVX512 PK_ALWAYS_INLINE float softmax_tile(float* s, float& m, float* l, int64_t nv) {
  __m512 mx = _mm512_load_ps(s);
  for (int64_t v = 1; v < nv; ++v) mx = _mm512_max_ps(mx, _mm512_load_ps(s + 16 * v));
  float alpha = 1.f;
  __m512 sum = _mm512_load_ps(l);
  // m = -inf (the first step): any finite score moves it. A NaN score never does, and reaches o and l.
  if (_mm512_cmp_ps_mask(mx, _mm512_set1_ps(m + kLazy), _CMP_GT_OQ) != 0) {
    const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
    // Every score -inf (only with -inf in K) keeps m = -inf; subtracting 0 then gives p = 0, not NaN.
    alpha = attn::exp2_ss(m - (m_new == -std::numeric_limits<float>::infinity() ? 0.f : m_new));
    sum = _mm512_mul_ps(sum, _mm512_set1_ps(alpha));
    m = m_new;
  }
  const __m512 vm = _mm512_set1_ps(m == -std::numeric_limits<float>::infinity() ? 0.f : m);
  for (int64_t v = 0; v < nv; ++v) {
    const __m512 e = attn::exp2_ps(_mm512_sub_ps(_mm512_load_ps(s + 16 * v), vm));
    _mm512_store_ps(s + 16 * v, e);
    sum = _mm512_add_ps(sum, e);
  }
  _mm512_store_ps(l, sum);
  return alpha;
}

// ---- P . V ---------------------------------------------------------------------------------------

// P.V accumulators of G heads x 16 NV columns: loaded from o and rescaled by alpha, stored back.
template <int D, int G, int NV>
PK_AVX512 PK_ALWAYS_INLINE void load_acc(__m512 (&acc)[G][NV], const float* o, const float* alpha, int col0) {
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h) {
    const __m512 a = _mm512_set1_ps(alpha[h]);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_mul_ps(a, _mm512_load_ps(o + h * D + col0 + 16 * c));
  }
}
template <int D, int G, int NV>
PK_AVX512 PK_ALWAYS_INLINE void store_acc(const __m512 (&acc)[G][NV], float* o, int col0) {
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) _mm512_store_ps(o + h * D + col0 + 16 * c, acc[h][c]);
}

// o[h][col0:col0+16NV] = alpha[h] o[h][...] + sum_j p[h][j] V[j][...] for G heads (rows of o stride D,
// of p stride kT), NV a multiple of 4 (64 columns per group of four vectors). bf16: o columns de-interleaved
// per 32 (16 even, 16 odd). PF: prefetch the rows pf.far ahead (up to npf, the rows known) and, where the item
// has it, pf.near ahead.
template <Kind KD, int D, int G, int NV, bool PF>
PK_AVX512 PK_ALWAYS_INLINE void pv(float* o, const float* p, const float* alpha, const char* vb,
                                   const int64_t* off, int64_t n, int64_t npf, Pf pf, int col0) {
  static_assert(NV % 4 == 0 && G * NV <= 16, "16 accumulators at most, 64 columns per group");
  constexpr int64_t ES = KD == Kind::f32 ? 4 : 2;
  const int64_t *offd = off + pf.far, *offn = off + pf.near, nd = npf - pf.far;
  const int64_t nn = pf.with_near ? npf - pf.near : 0;
  __m512 acc[G][NV];
  load_acc<D, G, NV>(acc, o, alpha, col0);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 2
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (PF) {  // the columns this block reads, of the rows pf.far (and pf.near) ahead
      if (j < nd) prefetch_part(vb + offd[j], col0 * ES, (col0 + 16 * NV) * ES);
      if (j < nn) prefetch_part_near(vb + offn[j], col0 * ES, (col0 + 16 * NV) * ES);
    }
    // Four vectors at a time in named registers (an array of them GCC may keep on the stack as well).
#pragma GCC unroll 2
    for (int c = 0; c < NV; c += 4) {
      __m512 v0, v1, v2, v3;
      if constexpr (KD == Kind::f32) {
        const float* vr = reinterpret_cast<const float*>(vb + off[j]) + col0 + 16 * c;
        v0 = _mm512_loadu_ps(vr);
        v1 = _mm512_loadu_ps(vr + 16);
        v2 = _mm512_loadu_ps(vr + 32);
        v3 = _mm512_loadu_ps(vr + 48);
      } else {
        const char* vr = vb + off[j] + (col0 + 16 * c) * 2;
        const __m512i x0 = _mm512_loadu_si512(vr), x1 = _mm512_loadu_si512(vr + 64);
        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(x0, 16));
        v1 = _mm512_castsi512_ps(_mm512_and_si512(x0, hi));
        v2 = _mm512_castsi512_ps(_mm512_slli_epi32(x1, 16));
        v3 = _mm512_castsi512_ps(_mm512_and_si512(x1, hi));
      }
      PK_PIN(v0);
      PK_PIN(v1);
      PK_PIN(v2);
      PK_PIN(v3);
#pragma GCC unroll 4
      for (int h = 0; h < G; ++h) {
        const __m512 pb = _mm512_set1_ps(p[h * kT + j]);
        acc[h][c] = _mm512_fmadd_ps(pb, v0, acc[h][c]);
        acc[h][c + 1] = _mm512_fmadd_ps(pb, v1, acc[h][c + 1]);
        acc[h][c + 2] = _mm512_fmadd_ps(pb, v2, acc[h][c + 2]);
        acc[h][c + 3] = _mm512_fmadd_ps(pb, v3, acc[h][c + 3]);
      }
    }
  }
  store_acc<D, G, NV>(acc, o, col0);
}

// One token pair of pv_dp: rows r0 and r1 (null: a zero row) of 64 columns, pair k of P.
template <int G>
PK_AVX512BF16 PK_ALWAYS_INLINE void pv_pair(__m512 (&acc)[G][4], const uint32_t* pp, int64_t k, const char* r0,
                                            const char* r1) {
  const __m512i x0 = _mm512_loadu_si512(r0), x1 = _mm512_loadu_si512(r0 + 64);
  const __m512i y0 = r1 ? _mm512_loadu_si512(r1) : _mm512_setzero_si512();
  const __m512i y1 = r1 ? _mm512_loadu_si512(r1 + 64) : _mm512_setzero_si512();
  const __m512bh v0 = (__m512bh)_mm512_unpacklo_epi16(x0, y0), v1 = (__m512bh)_mm512_unpackhi_epi16(x0, y0);
  const __m512bh v2 = (__m512bh)_mm512_unpacklo_epi16(x1, y1), v3 = (__m512bh)_mm512_unpackhi_epi16(x1, y1);
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h) {
    const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[h * kT + k]));
    acc[h][0] = _mm512_dpbf16_ps(acc[h][0], v0, pb);
    acc[h][1] = _mm512_dpbf16_ps(acc[h][1], v1, pb);
    acc[h][2] = _mm512_dpbf16_ps(acc[h][2], v2, pb);
    acc[h][3] = _mm512_dpbf16_ps(acc[h][3], v3, pb);
  }
}

// bf16 with AVX512_BF16: o[h][col0:col0+64] = alpha[h] o[h][...] + sum_j p[h][j] V[j][...] on token
// pairs with vdpbf16ps: V rows j and j+1 word-interleaved in registers (vpunpckl/hwd), P as bf16 pairs
// (pp[h][j/2] = (p_j, p_j+1), row stride kT words, rounded to nearest even, as FlashAttention feeds P to its bf16 MMA).
// Half the FMA-type instructions of pv() for bf16; P's rounding (2^-9 relative) is below the bf16
// output's own. o columns per 32: lane l of the "lo" vector holds columns 8l..8l+3, of "hi" 8l+4..8l+7.
// Prefetches as pv().
template <int D, int G, bool PF>
PK_AVX512BF16 PK_ALWAYS_INLINE void pv_dp(float* o, const uint32_t* pp, const float* alpha, const char* vb,
                                          const int64_t* off, int64_t n, int64_t npf, Pf pf, int col0) {
  const int64_t *offd = off + pf.far, *offn = off + pf.near, nd = npf - pf.far;
  const int64_t nn = pf.with_near ? npf - pf.near : 0;
  __m512 acc[G][4];
  load_acc<D, G, 4>(acc, o, alpha, col0);
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {
    if constexpr (PF) {
      if (j < nd) prefetch_part(vb + offd[j], col0 * 2, (col0 + 64) * 2);
      if (j + 1 < nd) prefetch_part(vb + offd[j + 1], col0 * 2, (col0 + 64) * 2);
      if (j < nn) prefetch_part_near(vb + offn[j], col0 * 2, (col0 + 64) * 2);
      if (j + 1 < nn) prefetch_part_near(vb + offn[j + 1], col0 * 2, (col0 + 64) * 2);
    }
    pv_pair<G>(acc, pp, j / 2, vb + off[j] + col0 * 2, vb + off[j + 1] + col0 * 2);
  }
  if (j < n) pv_pair<G>(acc, pp, j / 2, vb + off[j] + col0 * 2, nullptr);  // odd n: the pair's p is (p_j, 0)
  store_acc<D, G, 4>(acc, o, col0);
}

// p: [g][kT] probabilities; for bf16_dp they are first rewritten in place as bf16 pairs (the first
// kT/2 words of each row; the scores past n are 0, so an odd n pairs its last p with 0).
template <Kind KD, int D>
PK_AVX512BF16 void pv_all(int64_t g, float* o, float* p, const float* alpha, const char* vb,
                          const int64_t* off, int64_t n, int64_t npf, Pf pf) {
  if constexpr (KD == Kind::bf16_dp) {
    const int64_t nv = (n + 15) / 16;
    for (int64_t h = 0; h < g; ++h)
      for (int64_t v = 0; v < nv; ++v)  // reads floats [16v, 16v+16), writes words [8v, 8v+8)
        _mm256_store_si256(reinterpret_cast<__m256i*>(p + h * kT + 8 * v),
                           (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(p + h * kT + 16 * v)));
  }
  int64_t h = 0;
  // Heads [h, h + G) over columns [col0, col0 + 16 NV). The first block of heads of each column range
  // prefetches those columns of the V rows.
  // The lambda carries the target of pv_all: a lambda does not inherit it, and a default-target caller
  // cannot inline the AVX-512 kernels (a build error on CPUs without AVX-512 under -march=native). Always
  // inlined: with the whole-row instances GCC left one out of line, and the 4-head rows read 3-7% slower.
  auto block = [&](auto G, auto NV, int col0) PK_AVX512BF16 __attribute__((always_inline)) {
    if constexpr (KD == Kind::bf16_dp) {
      static_assert(decltype(NV)::value == 4, "pv_dp takes 64 columns per pass");
      const uint32_t* pp = reinterpret_cast<const uint32_t*>(p + h * kT);
      if (h == 0)
        pv_dp<D, G.value, true>(o + h * D, pp, alpha + h, vb, off, n, npf, pf, col0);
      else
        pv_dp<D, G.value, false>(o + h * D, pp, alpha + h, vb, off, n, npf, pf, col0);
    } else if (h == 0) {
      pv<KD, D, G.value, NV.value, true>(o + h * D, p + h * kT, alpha + h, vb, off, n, npf, pf, col0);
    } else {
      pv<KD, D, G.value, NV.value, false>(o + h * D, p + h * kT, alpha + h, vb, off, n, npf, pf, col0);
    }
  };
  using I = std::integral_constant<int, 4>;  // 64 columns
  // fp32 rows wider than 64 columns (D = 128) of one or two heads: whole rows in one pass (8 or 16
  // accumulators), so each V row is walked once, front to back, with half the broadcasts and loop steps of
  // two 64-column passes. Zen 5, decode harness, B8 Hq32 L4096 D128, builds alternated 4-6x in five runs
  // (notes/cpu_decode.md, fifteenth session): g = 1 contiguous 26.1-30.0 -> 28.6-32.7 GB/s on 1 thread,
  // 37.2-38.1 -> 38.6-41.5 on 2, paged level; g = 2 +4-5%; in L2 +6-14%. bf16 on vdpbf16ps (pv_dp) was
  // level or worse from DRAM and keeps 64 columns, as does the widening bf16 path (not measured); with 4
  // heads two whole-row passes (the second from L2) lose 4-9% to the 64-column ones.
  if constexpr (KD == Kind::f32 && D / 16 > 4 && D / 16 <= 8) {
    using W = std::integral_constant<int, D / 16>;
    if (g == 1) return block(std::integral_constant<int, 1>(), W(), 0);
    if (g == 2) return block(std::integral_constant<int, 2>(), W(), 0);
  }
  for (int col0 = 0; col0 < D; col0 += 64) {
    h = 0;
    for (; h + kG <= g; h += kG) block(std::integral_constant<int, kG>(), I(), col0);
    switch (g - h) {
      case 3: block(std::integral_constant<int, 3>(), I(), col0); break;
      case 2: block(std::integral_constant<int, 2>(), I(), col0); break;
      case 1: block(std::integral_constant<int, 1>(), I(), col0); break;
      default: break;
    }
  }
}

// ---- one work item and the epilogues -------------------------------------------------------------

struct Scratch {
  float* q;   // [nh*g][D] prepared query (fp32 scaled; bf16_dp: bf16 pairs; bf16_w: de-interleaved fp32)
  float* qq;  // the same per quad of heads, heads in the lanes (scores_quad16), when g % 4 == 0
  float* o;  // [nh*g][D] accumulators
  float* s;  // [g][kT] scores, then probabilities, of the current step
  float* m;  // [nh*g] running max (base 2)
  float* l;  // [nh*g][16] running sum, 16 partial sums per head
  float* a;  // [g] rescale factors of the current step
};

// Writes head row o (length D; column order per 32 as the P.V kernel of KD leaves it) times inv to dst.
template <typename T, Kind KD, int D>
PK_AVX512 PK_ALWAYS_INLINE void store_row(T* dst, const float* o, float inv) {
  const __m512 vi = _mm512_set1_ps(inv);
  if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 8
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(o + 16 * c), vi));
  } else {
    // bf16_w: 16 even then 16 odd columns; bf16_dp: lanes of 4 (columns 8l..8l+3, then 8l+4..8l+7).
    const __m512i lo = KD == Kind::bf16_dp
                           ? _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0)
                           : _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = KD == Kind::bf16_dp
                           ? _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8)
                           : _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#pragma GCC unroll 4
    for (int c = 0; c < D / 32; ++c) {
      const __m512 e = _mm512_mul_ps(_mm512_load_ps(o + 32 * c), vi);
      const __m512 od = _mm512_mul_ps(_mm512_load_ps(o + 32 * c + 16), vi);
      uint16_t* d = reinterpret_cast<uint16_t*>(dst) + 32 * c;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), vec::narrow_bf16(_mm512_permutex2var_ps(e, lo, od)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), vec::narrow_bf16(_mm512_permutex2var_ps(e, hi, od)));
    }
  }
}

// One work item: query heads of kv heads [hk0, hk0 + nh) of sequence b, tokens of chunk ci. Steps go
// tile by tile and, within a tile, kv head by kv head; each step's rows are prefetched (to L2) while
// the step before it computes.
template <typename T, Kind KD, int D>
PK_AVX512BF16 void item(const Ctx& x, int64_t b, int64_t hk0, int64_t nh, int64_t ci, const Scratch& sc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, n = p.context_lens[b];
  const int64_t t0 = ci * x.chunk, t1 = std::min(n, t0 + x.chunk);
  constexpr int64_t es = sizeof(T);
  // Query rows of the item's heads, prepared for the dot product.
  const T* Q = static_cast<const T*>(p.q) + (b * p.Hq + hk0 * g) * D;
  const __m512 vc = _mm512_set1_ps(x.c);
  for (int64_t h = 0; h < nh * g; ++h) {
    float* qd = sc.q + h * D;
    if constexpr (KD == Kind::f32) {
      for (int c = 0; c < D / 16; ++c) _mm512_store_ps(qd + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(Q + h * D + 16 * c), vc));
    } else if constexpr (KD == Kind::bf16_dp) {
      for (int c = 0; c < D / 32; ++c) _mm512_store_si512(qd + 16 * c, _mm512_loadu_si512(Q + h * D + 32 * c));
    } else {
      const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
      for (int c = 0; c < D / 32; ++c) {
        const __m512i v = _mm512_loadu_si512(Q + h * D + 32 * c);
        _mm512_store_ps(qd + 32 * c, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), vc));
        _mm512_store_ps(qd + 32 * c + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), vc));
      }
    }
    for (int c = 0; c < D / 16; ++c) _mm512_store_ps(sc.o + h * D + 16 * c, _mm512_setzero_ps());
    sc.m[h] = -std::numeric_limits<float>::infinity();
    _mm512_store_ps(sc.l + 16 * h, _mm512_setzero_ps());
  }
  if (use_quad<KD>(g)) {
    // Quad layout: chunk c of quad u = 16 bytes from each of its 4 heads' rows, head-major in the lanes.
    constexpr int NCH = quad_chunks<KD, D>();
    for (int64_t u = 0; u < nh * g / 4; ++u)
      for (int c = 0; c < NCH; ++c)
        for (int h = 0; h < 4; ++h)
          std::memcpy(sc.qq + u * 4 * D + 16 * c + 4 * h, sc.q + (4 * u + h) * D + 4 * c, 16);
  }
  const char* kb = static_cast<const char*>(p.k);
  const char* vb = static_cast<const char*>(p.v);
  // Steps: x.st tokens of one kv head, heads inner (kT on a contiguous cache; on a paged one cpu.h paged_step(),
  // so a step reads x.st / block_size blocks of one head and then the same blocks of the next head; the rows are
  // found page by page). Zen 4 paged16 read 5-11% faster in 32-token steps than in 128 (fewer streams at once);
  // on Zen 5, with an earlier kernel, 32- and 64-row steps were no faster (notes/cpu_decode.md).
  const Pf pf = item_pf<D, es>();
  // Row offsets of the current step and of the steps after it, at least pf.far rows past the current
  // step's end (so the loops can prefetch pf.far rows ahead across step boundaries): off[0, have).
  alignas(64) int64_t off[3 * kT];
  int64_t have = 0, gts = t0, ghk = hk0;  // the next step to append
  auto fill = [&](int64_t need) {
    while (have < need && gts < t1) {
      const int64_t c = std::min(x.st, t1 - gts);
      tile_rows(p, b, ghk, gts, c, es, off + have);
      have += c;
      if (++ghk == hk0 + nh) {
        ghk = hk0;
        gts += x.st;
      }
    }
  };
  for (int64_t ts = t0; ts < t1; ts += x.st) {
    const int64_t nt = std::min(x.st, t1 - ts), nv = (nt + 15) / 16;
    for (int64_t hk = hk0; hk < hk0 + nh; ++hk) {
      fill(nt + pf.far);
      const int64_t h0 = (hk - hk0) * g;
      scores<KD, D>(g, sc.q + h0 * D, sc.qq + h0 * D, kb, off, nt, have, pf, x.c, sc.s);
      for (int64_t h = 0; h < g; ++h) sc.a[h] = softmax_tile(sc.s + h * kT, sc.m[h0 + h], sc.l + 16 * (h0 + h), nv);
      pv_all<KD, D>(g, sc.o + h0 * D, sc.s, sc.a, vb, off, nt, have, pf);
      std::copy(off + nt, off + have, off);
      have -= nt;
    }
  }
  for (int64_t hk = hk0; hk < hk0 + nh; ++hk) {
    const int64_t h0 = (hk - hk0) * g;
    if (x.part == nullptr || n <= x.chunk) {
      T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
      for (int64_t h = 0; h < g; ++h) store_row<T, KD, D>(O + h * D, sc.o + (h0 + h) * D, 1.f / _mm512_reduce_add_ps(_mm512_load_ps(sc.l + 16 * (h0 + h))));
      continue;
    }
    float* part = x.part + ((b * p.Hkv + hk) * x.nchunk + ci) * g * (D + 16);
    for (int64_t h = 0; h < g; ++h) {
      float* dst = part + h * (D + 16);
      for (int c = 0; c < D / 16; ++c) _mm512_store_ps(dst + 16 * c, _mm512_load_ps(sc.o + (h0 + h) * D + 16 * c));
      dst[D] = sc.m[h0 + h];
      dst[D + 1] = _mm512_reduce_add_ps(_mm512_load_ps(sc.l + 16 * (h0 + h)));
    }
  }
}

// Merges the chunk partials of (b, hk) for its g heads into the output (log-sum-exp, base 2).
template <typename T, Kind KD, int D>
PK_AVX512 void merge(const Ctx& x, int64_t b, int64_t hk, float* tmp) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, n = p.context_lens[b];
  if (n <= x.chunk) return;  // written by its only item
  const int64_t nc = (n + x.chunk - 1) / x.chunk;
  const float* part = x.part + (b * p.Hkv + hk) * x.nchunk * g * (D + 16);
  T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
  for (int64_t h = 0; h < g; ++h) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < nc; ++c) M = std::max(M, part[(c * g + h) * (D + 16) + D]);
    const float mu = M == -std::numeric_limits<float>::infinity() ? 0.f : M;
    for (int c = 0; c < D / 16; ++c) _mm512_store_ps(tmp + 16 * c, _mm512_setzero_ps());
    float L = 0.f;
    for (int64_t c = 0; c < nc; ++c) {
      const float* src = part + (c * g + h) * (D + 16);
      const float w = attn::exp2_ss(src[D] - mu);
      L += w * src[D + 1];
      const __m512 vw = _mm512_set1_ps(w);
      for (int v = 0; v < D / 16; ++v)
        _mm512_store_ps(tmp + 16 * v, _mm512_fmadd_ps(vw, _mm512_load_ps(src + 16 * v), _mm512_load_ps(tmp + 16 * v)));
    }
    store_row<T, KD, D>(O + h * D, tmp, 1.f / L);
  }
}

// One thread's buffers for the items of nh kv heads of g query heads each (Scratch) and its merges (tb),
// with denormals flushed while the thread works.
template <Kind KD, int D>
struct ThreadScratch {
  attn::FlushDenormals ftz;
  AlignedBuf qb, qqb, ob, sb, mb, lb, tb;
  Scratch sc;
  ThreadScratch(int64_t g, int64_t nh)
      : qb(static_cast<size_t>(nh * g * D * 4)), qqb(use_quad<KD>(g) ? static_cast<size_t>(nh * g * D * 4) : 0),
        ob(static_cast<size_t>(nh * g * D * 4)), sb(static_cast<size_t>(g * kT * 4)),
        mb(static_cast<size_t>((nh * g + g) * 4)), lb(static_cast<size_t>(nh * g * 16 * 4)),
        tb(static_cast<size_t>(D * 4)),
        sc{qb.as<float>(), qqb.as<float>(), ob.as<float>(), sb.as<float>(), mb.as<float>(), lb.as<float>(),
           mb.as<float>() + nh * g} {}
};

template <typename T, Kind KD, int D>
void run_avx512(const DecodeParams& p) {
  const int64_t Hkv = p.Hkv, g = p.Hq / p.Hkv;
  // kv heads per item. Contiguous: one (its context is one long run). Paged: all of them, because a
  // block holds every head's rows [Hkv][block_size][D] back to back: walking the heads inside each
  // block reads 64-256 KB runs instead of one 4-8 KB run per block, page, and TLB entry. Contexts are
  // split only when the units alone cannot keep every thread busy (attn::split_decode).
  const int64_t nh = p.block_table ? Hkv : 1;
  const attn::DecodeSplit w = attn::split_decode(p, sizeof(T), kT, omp_in_parallel() ? 1 : omp_get_max_threads(),
                                                 kMinChunk, kMinParallelBytes, nh);
  AlignedBuf part(w.nchunk > 1 ? static_cast<size_t>(p.B * Hkv * w.nchunk * g * (D + 16) * 4) : 0);
  // Tokens per step: kT on a contiguous cache (one kv head per item); on a paged one cpu.h paged_step() (16..kT,
  // read once per call), raised to a whole block where a block holds more rows (a step then reads whole runs).
  int64_t st = kT;
  if (p.block_table)
    for (st = paged_step(); st < std::min(p.block_size, kT);) st *= 2;
  const Ctx x{&p, g, w.chunk, p.scale * attn::kLog2e, w.nchunk > 1 ? part.as<float>() : nullptr, w.nchunk, st};
  attn::run_decode_split(
      w, Hkv, [&] { return ThreadScratch<KD, D>(g, nh); },
      [&](int64_t b, int64_t hk, int64_t c, const ThreadScratch<KD, D>& t) { item<T, KD, D>(x, b, hk, nh, c, t.sc); },
      [&](int64_t b, int64_t hk, const ThreadScratch<KD, D>& t) { merge<T, KD, D>(x, b, hk, t.tb.template as<float>()); });
}

#endif  // __x86_64__

// ---- portable path: plain C++ on the target's vectors (vec_portable.h), any head dim ------------------
// The AVX2 tier's work split (attn::split_decode: items of (sequence, kv heads, context chunk), all kv heads of
// a sequence per item on a paged cache; partials merged when a context is split); per item all g query heads of
// each kv head, so each K/V row is read once: per tile of kPt tokens, each K row (bf16 widened or split into
// pairs, or a head dim that is not a whole number of vectors, copied into a padded row first) is dotted with the g
// query rows, the scores go through an online softmax (vector exp2, base 2), and the V rows are added into the g
// output rows with the accumulators in registers across the tile (tile_add).
constexpr int64_t kPt = 32;  // tokens per tile
static_assert(kPt % pv::kLanes == 0, "a tile's scores are whole vectors");

template <typename T> struct PortableItem {
  const DecodeParams* p;
  int64_t g, Dp, chunk, nchunk;
  float c;
  float* part;  // [B*Hkv][nchunk][g][Dp + 2] (o, m, l), or null
};

// Row r (D values) as Dp floats at dst, zero past D: for a head dim that is not a whole number of vectors.
template <typename T> inline const float* padded_row(const T* r, int64_t D, int64_t Dp, float* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = load_f(r, d);
  for (int64_t d = D; d < Dp; ++d) dst[d] = 0.f;
  return dst;
}

// A vector of a K / V row: fp32, or bf16 widened in registers.
inline pv::vf vload(const float* p) { return pv::load(p); }
inline pv::vf vload(const bf16* p) { return pv::load(reinterpret_cast<const uint16_t*>(p)); }
// The dot products of K row k with the g query rows q [g][Dp] (row_dots), or the row added into the g output
// rows o [g][Dp] with weights e[h * kPt] (row_add: rows of a head dim that is not a whole number of vectors, copied
// into a padded row; tile_add below otherwise); H heads at a time, so each vector of the row is loaded (and widened)
// once for all of them.
template <int H, class R> inline void row_dots_h(const R* k, const float* q, int64_t Dp, float* s) {
  if constexpr (H == 1) {  // two chains of FMAs, not one
    pv::vf a0{}, a1{};
    int64_t v = 0;
    for (; v + 2 <= Dp / pv::kLanes; v += 2) {
      a0 += pv::load(q + v * pv::kLanes) * vload(k + v * pv::kLanes);
      a1 += pv::load(q + (v + 1) * pv::kLanes) * vload(k + (v + 1) * pv::kLanes);
    }
    if (v < Dp / pv::kLanes) a0 += pv::load(q + v * pv::kLanes) * vload(k + v * pv::kLanes);
    s[0] = pv::hsum(a0 + a1);
    return;
  }
  pv::vf a[H] = {};
  for (int64_t v = 0; v < Dp / pv::kLanes; ++v) {
    const pv::vf kv = vload(k + v * pv::kLanes);
    for (int i = 0; i < H; ++i) a[i] += pv::load(q + i * Dp + v * pv::kLanes) * kv;
  }
  for (int i = 0; i < H; ++i) s[i * kPt] = pv::hsum(a[i]);
}
template <class R> inline void row_dots(const R* k, const float* q, int64_t g, int64_t Dp, float* s) {
  int64_t h = 0;
  for (; h + 4 <= g; h += 4) row_dots_h<4>(k, q + h * Dp, Dp, s + h * kPt);
  for (; h < g; ++h) row_dots_h<1>(k, q + h * Dp, Dp, s + h * kPt);
}
// q.K for bf16 rows kept as pairs: q and o hold each block of 2 * kLanes values in the order
// [even-numbered | odd-numbered] (pv::load_bf16_pairs), so a row is split in registers and never widened.
template <int H> inline void pair_dots_h(const bf16* k, const float* q, int64_t Dp, float* s) {
  constexpr int L = pv::kLanes;
  pv::vf a[H] = {};
  for (int64_t c = 0; c < Dp; c += 2 * L) {
    pv::vf ev, od;
    pv::load_bf16_pairs(reinterpret_cast<const uint16_t*>(k + c), ev, od);
    for (int i = 0; i < H; ++i) a[i] += pv::load(q + i * Dp + c) * ev + pv::load(q + i * Dp + c + L) * od;
  }
  for (int i = 0; i < H; ++i) s[i * kPt] = pv::hsum(a[i]);
}
inline void pair_dots(const bf16* k, const float* q, int64_t g, int64_t Dp, float* s) {
  int64_t h = 0;
  for (; h + 4 <= g; h += 4) pair_dots_h<4>(k, q + h * Dp, Dp, s + h * kPt);
  for (; h < g; ++h) pair_dots_h<1>(k, q + h * Dp, Dp, s + h * kPt);
}
template <int H, class R> inline void row_add_h(const R* vr, const float* e, int64_t Dp, float* o) {
  float w[H];
  for (int i = 0; i < H; ++i) w[i] = e[i * kPt];
  for (int64_t v = 0; v < Dp / pv::kLanes; ++v) {
    const pv::vf x = vload(vr + v * pv::kLanes);
    for (int i = 0; i < H; ++i) pv::store(o + i * Dp + v * pv::kLanes, pv::load(o + i * Dp + v * pv::kLanes) + x * w[i]);
  }
}
template <class R> inline void row_add(const R* vr, const float* e, int64_t g, int64_t Dp, float* o) {
  int64_t h = 0;
  for (; h + 4 <= g; h += 4) row_add_h<4>(vr, e + h * kPt, Dp, o + h * Dp);
  for (; h < g; ++h) row_add_h<1>(vr, e + h * kPt, Dp, o + h * Dp);
}

// The lines of bytes [b0, b1) of a row, into L1 or (l1 false) L2, as the AVX-512 decode's run-time level says
// (cpu.h stream_prefetch: L2 on Sapphire Rapids and Zen 4, where L1 read 10-12% slower; notes/cpu_decode.md).
inline void prefetch_lines(const void* r, int64_t b0, int64_t b1, bool l1) {
  const char* c = static_cast<const char*>(r);
  if (l1)  // the level chosen once per row, not per line
    for (int64_t i = b0; i < b1; i += 64) attn::prefetch_stream(c + i, true);
  else
    for (int64_t i = b0; i < b1; i += 64) attn::prefetch_stream(c + i, false);
}

// Accumulator registers of a P.V register block: half of the target's vector registers (32 on AVX-512 and on
// aarch64, 16 otherwise); the rest hold the row's vectors and the weights.
#if PK_PV_BYTES == 64 || defined(__aarch64__)
constexpr int kAccRegs = 16;
#else
constexpr int kAccRegs = 8;
#endif

// o[h][c0 .. c0 + C kLanes) += sum over j < nj of e[h * kPt + j] V row j, for H heads, the accumulators in registers
// across the tile's rows (o is loaded and stored once per tile, not once per row). Pairs: bf16 rows read as
// load_bf16_pairs (C even; o in pair order). Beside row j, the same share of row j of the next step (pf[j], j <
// npf) is prefetched as this block's share of the columns, so that the prefetches spread over all the blocks.
template <int H, int C, bool Pairs, class R>
inline void tile_add_block(const R* const* vr, const float* e, int64_t nj, int64_t Dp, float* o, int64_t c0,
                           const R* const* pf, int64_t npf, int64_t rowb, bool l1) {
  constexpr int L = pv::kLanes;
  static_assert(!Pairs || C % 2 == 0, "pairs: whole blocks of 2 kLanes values");
  const int64_t pb0 = c0 * rowb / Dp / 64 * 64, pb1 = c0 + C * L >= Dp ? rowb : (c0 + C * L) * rowb / Dp;
  pv::vf acc[H][C];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = pv::load(o + h * Dp + c0 + c * L);
  for (int64_t j = 0; j < nj; ++j) {
    if (j < npf) prefetch_lines(pf[j], pb0, pb1, l1);
    pv::vf xv[C];
    if constexpr (Pairs) {
      for (int c = 0; c < C; c += 2)
        pv::load_bf16_pairs(reinterpret_cast<const uint16_t*>(vr[j] + c0 + c * L), xv[c], xv[c + 1]);
    } else {
      for (int c = 0; c < C; ++c) xv[c] = vload(vr[j] + c0 + c * L);
    }
    for (int h = 0; h < H; ++h) {
      const pv::vf w = pv::splat(e[h * kPt + j]);
      for (int c = 0; c < C; ++c) acc[h][c] += xv[c] * w;
    }
  }
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < C; ++c) pv::store(o + h * Dp + c0 + c * L, acc[h][c]);
}
// The columns [c0, Dp) of H heads in blocks of C vectors, the last ones in smaller blocks.
template <int H, int C, bool Pairs, class R>
inline void tile_add_cols(const R* const* vr, const float* e, int64_t nj, int64_t Dp, float* o, int64_t c0,
                          const R* const* pf, int64_t npf, int64_t rowb, bool l1) {
  for (; c0 + C * pv::kLanes <= Dp; c0 += C * pv::kLanes)
    tile_add_block<H, C, Pairs>(vr, e, nj, Dp, o, c0, pf, npf, rowb, l1);
  if constexpr (C > (Pairs ? 2 : 1))
    if (c0 < Dp) tile_add_cols<H, C / 2, Pairs>(vr, e, nj, Dp, o, c0, pf, npf, rowb, l1);
}
// P.V of one step: the nj rows vr added into the g output rows o [g][Dp] with weights e[h * kPt + j], 4 heads at a
// time (then one), prefetching the next step's rows pf[j < npf] on the way. Dp a whole number of vectors (of pairs
// of vectors with Pairs). Sapphire Rapids VM, 1 thread, in L2: fp32 g = 1 47 -> 62 GB/s, g = 4 -17% time, bf16 g = 4
// -13% (notes/cpu_decode.md).
template <bool Pairs, class R>
inline void tile_add(const R* const* vr, const float* e, int64_t nj, int64_t g, int64_t Dp, float* o,
                     const R* const* pf, int64_t npf, int64_t rowb, bool l1) {
  constexpr int C4 = kAccRegs / 4 < 2 ? 2 : kAccRegs / 4;
  int64_t h = 0;
  for (; h + 4 <= g; h += 4, npf = 0) tile_add_cols<4, C4, Pairs>(vr, e + h * kPt, nj, Dp, o + h * Dp, 0, pf, npf, rowb, l1);
  for (; h < g; ++h, npf = 0) tile_add_cols<1, kAccRegs, Pairs>(vr, e + h * kPt, nj, Dp, o + h * Dp, 0, pf, npf, rowb, l1);
}

// One work item: the g query heads of each of kv heads [hk0, hk0 + nh) of sequence b, tokens of chunk ci.
// Steps of kPt tokens of one kv head, heads inner (as the AVX2 and AVX-512 items): on a paged cache nh = Hkv,
// so the heads' rows of a block (stored [Hkv][block_size][D], back to back) are read one after the other
// instead of one run of block_size rows per block and head. Each step prefetches the next step's rows.
template <typename T>
void portable_item(const PortableItem<T>& x, int64_t b, int64_t hk0, int64_t nh, int64_t ci, float* sc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, D = p.D, Dp = x.Dp, nq = nh * g;
  const int64_t n = p.context_lens[b], t0 = ci * x.chunk, t1 = std::min(n, t0 + x.chunk);
  // scratch (sized by run_portable): q [nq][Dp], o [nq][Dp], s [g][kPt], m [nq], l [nq], row [Dp]
  float *q = sc, *o = q + nq * Dp, *s = o + nq * Dp, *m = s + g * kPt, *l = m + nq, *row = l + nq;
  // bf16 rows of whole blocks of 2 * kLanes values go as pairs (pair_dots, tile_add): q and o in pair order
  const bool pairs = std::is_same_v<T, bf16> && D % (2 * pv::kLanes) == 0;
  const auto at = [&](int64_t d) { return pairs ? pv::pair_pos(d) : d; };
  const T* Q = static_cast<const T*>(p.q) + (b * p.Hq + hk0 * g) * D;
  for (int64_t h = 0; h < nq; ++h) {
    for (int64_t d = 0; d < Dp; ++d) {
      q[h * Dp + at(d)] = d < D ? load_f(Q, h * D + d) * x.c : 0.f;
      o[h * Dp + d] = 0.f;
    }
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const bool l1 = attn::t_prefetch_l1;  // this CPU's level (cpu.h stream_prefetch), read once per item
  const T *kr[kPt], *kn[kPt], *vn[kPt];
  const T* vr[kPt];
  const int64_t rowb = D * static_cast<int64_t>(sizeof(T));
  attn::tile_rows(p, K, b, hk0, t0, std::min(kPt, t1 - t0), kn);
  attn::tile_rows(p, V, b, hk0, t0, std::min(kPt, t1 - t0), vn);
  for (int64_t j0 = t0, hk = hk0; j0 < t1;) {
    const int64_t nj = std::min(kPt, t1 - j0);
    int64_t nj0 = j0, nhk = hk + 1;  // the next step: the next kv head, or the first one at the next tile
    if (nhk == hk0 + nh) {
      nhk = hk0;
      nj0 += kPt;
    }
    const int64_t nn = nj0 < t1 ? std::min(kPt, t1 - nj0) : 0;
    std::copy(kn, kn + nj, kr);
    std::copy(vn, vn + nj, vr);
    attn::tile_rows(p, K, b, nhk, nj0, nn, kn);  // the next step's rows, prefetched row by row below
    attn::tile_rows(p, V, b, nhk, nj0, nn, vn);
    float *qh = q + (hk - hk0) * g * Dp, *oh = o + (hk - hk0) * g * Dp;
    float *mh = m + (hk - hk0) * g, *lh = l + (hk - hk0) * g;
    j0 = nj0;
    hk = nhk;
    for (int64_t j = 0; j < nj; ++j) {
      if (j < nn)
        prefetch_lines(kn[j], 0, rowb, l1);
      if constexpr (std::is_same_v<T, bf16>)
        if (pairs) {
          pair_dots(kr[j], qh, g, Dp, s + j);
          continue;
        }
      if (D == Dp)
        row_dots(kr[j], qh, g, Dp, s + j);
      else
        row_dots(padded_row(kr[j], D, Dp, row), qh, g, Dp, s + j);
    }
    for (int64_t h = 0; h < g; ++h) {
      float* sh = s + h * kPt;
      for (int64_t j = nj; j < kPt; ++j) sh[j] = -std::numeric_limits<float>::infinity();
      pv::softmax_step(sh, kPt, mh[h], lh[h], oh + h * Dp, Dp);
    }
    if (pairs) {
      if constexpr (std::is_same_v<T, bf16>) tile_add<true>(vr, s, nj, g, Dp, oh, vn, nn, rowb, l1);
    } else if (D == Dp) {
      tile_add<false>(vr, s, nj, g, Dp, oh, vn, nn, rowb, l1);
    } else {
      for (int64_t j = 0; j < nj; ++j) {
        if (j < nn)
          prefetch_lines(vn[j], 0, rowb, l1);
        row_add(padded_row(vr[j], D, Dp, row), s + j, g, Dp, oh);
      }
    }
  }
  for (int64_t hk = hk0; hk < hk0 + nh; ++hk) {
    const float *oh = o + (hk - hk0) * g * Dp, *mh = m + (hk - hk0) * g, *lh = l + (hk - hk0) * g;
    if (x.part == nullptr) {
      T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
      for (int64_t h = 0; h < g; ++h)
        for (int64_t d = 0; d < D; ++d) store_f(O, h * D + d, oh[h * Dp + at(d)] / lh[h]);
      continue;
    }
    float* part = x.part + ((b * p.Hkv + hk) * x.nchunk + ci) * g * (Dp + 2);
    for (int64_t h = 0; h < g; ++h) {
      for (int64_t d = 0; d < D; ++d) part[h * (Dp + 2) + d] = oh[h * Dp + at(d)];  // in column order
      part[h * (Dp + 2) + Dp] = mh[h];
      part[h * (Dp + 2) + Dp + 1] = lh[h];
    }
  }
}

// The chunk partials of (b, hk) merged into its g output rows (log-sum-exp, base 2).
template <typename T> void portable_merge(const PortableItem<T>& x, int64_t b, int64_t hk, float* acc) {
  const DecodeParams& p = *x.p;
  const int64_t g = x.g, D = p.D, Dp = x.Dp, nc = (p.context_lens[b] + x.chunk - 1) / x.chunk;
  T* O = static_cast<T*>(p.o) + (b * p.Hq + hk * g) * D;
  attn::merge_partials(x.part + (b * p.Hkv + hk) * x.nchunk * g * (Dp + 2), nc, g, Dp + 2, D, acc,
                       [](float v) { return pv::exp2(pv::splat(v))[0]; },
                       [&](int64_t h, const float* a, float L) {
                         for (int64_t d = 0; d < D; ++d) store_f(O, h * D + d, a[d] / L);
                       });
}

template <typename T>
void run_portable(const DecodeParams& p) {
  const int64_t g = p.Hq / p.Hkv, Dp = attn::round_up(p.D, int64_t(pv::kLanes));
  // kv heads per item: all of them on a paged cache (see portable_item), one on a contiguous cache (its
  // context is one long run per head).
  const int64_t nh = p.block_table ? p.Hkv : 1, nq = nh * g;
  const attn::DecodeSplit w = attn::split_decode(p, sizeof(T), kPt, omp_in_parallel() ? 1 : omp_get_max_threads(),
                                                 kMinChunk, kMinParallelBytes, nh);
  AlignedBuf part(w.nchunk > 1 ? static_cast<size_t>(p.B * p.Hkv * w.nchunk * g * (Dp + 2) * 4) : 0);
  const PortableItem<T> x{&p, g, Dp, w.chunk, w.nchunk, p.scale * attn::kLog2e, w.nchunk > 1 ? part.as<float>() : nullptr};
  // portable_item's scratch, then merge's D floats
  const int64_t item_floats = 2 * nq * Dp + g * kPt + 2 * nq + Dp;
  attn::run_decode_split(
      w, p.Hkv, [&] { return AlignedBuf(static_cast<size_t>((item_floats + p.D) * 4)); },
      [&](int64_t b, int64_t hk, int64_t c, const AlignedBuf& t) { portable_item<T>(x, b, hk, nh, c, t.as<float>()); },
      [&](int64_t b, int64_t hk, const AlignedBuf& t) { portable_merge<T>(x, b, hk, t.as<float>() + item_floats); });
}

template <typename T>
void dispatch(const DecodeParams& p) {
#if defined(__x86_64__)
  const Features f = enabled();  // the active ISA tier (cpu.h)
  if (!f.avx512f && f.avx2_fma && tier_decode_head_dim(p.D)) return decode_avx2(p);
  if (f.avx512f && tier_decode_head_dim(p.D)) {
    if constexpr (std::is_same_v<T, float>) {
      return p.D == 64 ? run_avx512<float, Kind::f32, 64>(p) : run_avx512<float, Kind::f32, 128>(p);
    } else {
      if (use_bf16_dot())
        return p.D == 64 ? run_avx512<bf16, Kind::bf16_dp, 64>(p) : run_avx512<bf16, Kind::bf16_dp, 128>(p);
      return p.D == 64 ? run_avx512<bf16, Kind::bf16_w, 64>(p) : run_avx512<bf16, Kind::bf16_w, 128>(p);
    }
  }
#endif
#if defined(__aarch64__)
  if (enabled().neon && tier_decode_head_dim(p.D)) return decode_neon(p);
#endif
  run_portable<T>(p);
}

}  // namespace

void decode(const DecodeParams& p) {
  if (p.dtype == DType::f32) return dispatch<float>(p);
  if (p.dtype == DType::bf16) return dispatch<bf16>(p);
  throw std::invalid_argument(std::string("native cpu decode does not support dtype ") + dtype_name(p.dtype));
}

}  // namespace pk::cpu
