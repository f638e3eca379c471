// Helpers of the AMX kernels (csrc/cpu/*_amx.cpp): the tile configuration they all use and a 16 x 16
// transpose of 32-bit words (the pair-interleaved "VNNI" packing of a B operand stored row by row); their
// scratch comes from scratch.h.
// Include only from files built with -mamx-tile -mamx-bf16 and AVX-512 (CMakeLists.txt), x86-64 only.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/scratch.h"
#include "cpu/vec.h"

namespace pk::cpu::amx {

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
  // Not _tile_loadconfig: GCC 12's version tells the compiler that ldtilecfg reads only the first 8 bytes
  // of the configuration, so the stores of the row counts may be dropped as dead (they were in an AMX
  // decode kernel tried on 2026-12-05, where this function was inlined into a tiny one: ldtilecfg then
  // faulted; notes/cpu_decode.md). The whole 64 bytes are the asm's input here.
  __asm__ volatile("ldtilecfg %0" : : "m"(c));
}

using vec::transpose16;  // vec.h

}  // namespace pk::cpu::amx
