// Helpers of the AMX kernels (csrc/cpu/*_amx.cpp): the tile configuration they all use and a 16 x 16
// transpose of 32-bit words (the pair-interleaved "VNNI" packing of a B operand stored row by row).
// Include only from files built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt), x86-64 only.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace pk::cpu::amx {

// Scratch kept per thread between calls (a fresh multi-MB buffer per call costs thousands of page
// faults); 64-byte aligned, contents undefined.
class Keep {
 public:
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(p_);
      cap_ = (bytes + 4095) / 4096 * 4096;
      p_ = std::aligned_alloc(64, cap_);
      if (!p_) {
        cap_ = 0;
        throw std::bad_alloc();
      }
    }
    return p_;
  }
  ~Keep() { std::free(p_); }

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};
// Larger needs are allocated for the call and freed.
constexpr size_t kKeepMax = size_t(64) << 20;

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All 8 tiles 16 rows x 64 bytes. Per thread, before its first tile instruction of a call; the thread
// ends its work with _tile_release().
inline void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}

// 16 x 16 transpose of 32-bit words, in place: afterwards lane c of v[r] is what lane r of v[c] was.
inline void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3; b[4g + j] holds column j + 4L in 128-bit lane L
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i c = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), d = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i e = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), f = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    v[j] = _mm512_shuffle_i32x4(c, e, 0x88);
    v[j + 8] = _mm512_shuffle_i32x4(c, e, 0xDD);
    v[j + 4] = _mm512_shuffle_i32x4(d, f, 0x88);
    v[j + 12] = _mm512_shuffle_i32x4(d, f, 0xDD);
  }
}

}  // namespace pk::cpu::amx
