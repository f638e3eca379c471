// AMX q.K for the bf16 decode (decode.cpp's AVX-512 kernel calls it on the amx tier): the scores of a
// step, S^T = K Q^T, with the K rows read in place as A tiles (16 tokens x 32 d, a row stride apart) and
// the g <= 16 query heads of a kv head as B tiles (16 d-pairs x 16 heads, pair-interleaved, prepared once
// per item). D = 128: 4 tdpbf16ps per 16 tokens replace ~450 AVX-512 instructions (the widened-K dots,
// 2 heads per pass, and their transposed sums); P.V stays on AVX-512 in decode.cpp.
//
// Tiles (amx::configure_tiles, all 16 x 64 B): tmm0 / tmm1 the scores of two 16-token groups (16 tokens x
// 16 heads fp32), tmm2 / tmm3 their K tiles, tmm4..tmm4 + D/32 - 1 the query tiles. A group whose 16 rows
// are not one stride apart (the tail of a context, a block boundary) is copied to a zero-padded staging
// tile first, so rows past the context are never read. The products of bf16 pairs are exact in fp32; the
// scale is applied to the sums (as the vdpbf16ps path does).
// Built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt); called only when the active tier is
// "amx". x86-64 only.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/amx_common.h"
#include "cpu/cpu.h"

namespace pk::cpu::decode_amx {
namespace {

// B tile c: row r = d-pair 32c + 2r, 2r + 1; column h = head h: qt[c][r][h][e] = q[h][32c + 2r + e], i.e.
// the 32-bit pair words of the g rows transposed (word 16c + r of row h -> word 256c + 16r + h).
template <int D>
void prepare_t(const uint16_t* q, int64_t g, uint16_t* qt) {
  uint32_t w[D / 2 * 16] = {};
  for (int64_t h = 0; h < g; ++h) {
    uint32_t row[D / 2];
    std::memcpy(row, q + h * D, D * 2);
    for (int k = 0; k < D / 2; ++k) w[k * 16 + h] = row[k];
  }
  std::memcpy(qt, w, sizeof w);
}

// Where the A tile of 16 rows off[0..16) starts and its row stride: in place when they are m = 16 rows a
// stride apart, else the m rows copied into `stage` (zeros after them).
template <int D>
inline const char* group_rows(const char* kb, const int64_t* off, int64_t m, uint16_t* stage,
                                        int64_t* stride) {
  constexpr int64_t rowb = D * 2;
  bool even = m == 16;
  for (int64_t i = 1; even && i < 16; ++i) even = off[i] == off[0] + i * rowb;
  *stride = rowb;
  if (even) return kb + off[0];
  for (int64_t i = 0; i < 16; ++i) {
    if (i < m)
      std::memcpy(stage + i * D, kb + off[i], rowb);
    else
      std::memset(stage + i * D, 0, rowb);
  }
  return reinterpret_cast<const char*>(stage);
}

// Scores of one group (16 tokens, m of them live) from its stored C tile: s[h * lds + i] for h < g.
inline void write_group(const float* cb, int64_t m, int64_t g, float cs, float* s, int64_t lds) {
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(cb + 16 * i);
  amx::transpose16(v);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), vc = _mm512_set1_ps(cs);
  const __mmask16 mk = m >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
  for (int64_t h = 0; h < g; ++h)
    _mm512_store_ps(s + h * lds, _mm512_mask_mul_ps(ninf, mk, _mm512_castsi512_ps(v[h]), vc));
}

// The step's n <= 64 tokens two groups of 16 at a time: scores in tmm0 / tmm1 (two accumulators, so the
// tdpbf16ps of a K line overlap), K tiles in tmm2 / tmm3, the query chunks in tmm4..tmm7 (loaded once per
// step). Tile numbers are immediates: the chunks are spelled out. Measured against one pass over all four
// groups (tmm0..tmm3, K and query tiles alternating in the other four): this is 10-20% faster in cache.
template <int D>
void scores_t(const char* kb, const int64_t* off, int64_t n, int64_t g, const uint16_t* qt, float cs, float* s,
              int64_t lds, int64_t npf, int64_t pfd) {
  constexpr int NC = D / 32;  // query tiles; also the 64-byte lines of a K row
  alignas(64) float cbuf[2][256];
  alignas(64) uint16_t stage[2][16 * D];
  _tile_loadd(4, qt, 64);
  _tile_loadd(5, qt + 512, 64);
  if constexpr (NC == 4) {
    _tile_loadd(6, qt + 1024, 64);
    _tile_loadd(7, qt + 1536, 64);
  }
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t ma = std::min<int64_t>(16, n - j0), mb = std::clamp<int64_t>(n - j0 - 16, 0, 16);
    int64_t sa = 0, sb = 0;
    const char* a = group_rows<D>(kb, off + j0, ma, stage[0], &sa);
    const char* b = mb > 0 ? group_rows<D>(kb, off + j0 + 16, mb, stage[1], &sb) : nullptr;
    // rows j with j + pfd < npf prefetch row j + pfd: line c of each next to the K tiles of line c
    const int64_t npre = std::clamp<int64_t>(npf - pfd - j0, 0, 32);
    auto line = [&](int c) {
      for (int64_t i = 0; i < npre; ++i) _mm_prefetch(kb + off[j0 + i + pfd] + 64 * c, _MM_HINT_T1);
    };
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(2, a, sa);
    _tile_dpbf16ps(0, 2, 4);
    if (b) {
      _tile_loadd(3, b, sb);
      _tile_dpbf16ps(1, 3, 4);
    }
    line(0);
    _tile_loadd(2, a + 64, sa);
    _tile_dpbf16ps(0, 2, 5);
    if (b) {
      _tile_loadd(3, b + 64, sb);
      _tile_dpbf16ps(1, 3, 5);
    }
    line(1);
    if constexpr (NC == 4) {
      _tile_loadd(2, a + 128, sa);
      _tile_dpbf16ps(0, 2, 6);
      if (b) {
        _tile_loadd(3, b + 128, sb);
        _tile_dpbf16ps(1, 3, 6);
      }
      line(2);
      _tile_loadd(2, a + 192, sa);
      _tile_dpbf16ps(0, 2, 7);
      if (b) {
        _tile_loadd(3, b + 192, sb);
        _tile_dpbf16ps(1, 3, 7);
      }
      line(3);
    }
    _tile_stored(0, cbuf[0], 64);
    if (b) _tile_stored(1, cbuf[1], 64);
    write_group(cbuf[0], ma, g, cs, s + j0, lds);
    if (b) write_group(cbuf[1], mb, g, cs, s + j0 + 16, lds);
  }
}

}  // namespace

void begin() { amx::configure_tiles(); }
void end() { _tile_release(); }

void prepare_q(const uint16_t* q, int64_t g, int D, uint16_t* qt) {
  if (D == 64)
    prepare_t<64>(q, g, qt);
  else
    prepare_t<128>(q, g, qt);
}

void scores(const char* kb, const int64_t* off, int64_t n, int D, int64_t g, const uint16_t* qt, float cs, float* s,
            int64_t lds, int64_t npf, int64_t pfd) {
  if (D == 64)
    scores_t<64>(kb, off, n, g, qt, cs, s, lds, npf, pfd);
  else
    scores_t<128>(kb, off, n, g, qt, cs, s, lds, npf, pfd);
}

}  // namespace pk::cpu::decode_amx
#endif  // __x86_64__
