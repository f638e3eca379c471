// The AMX tile unit in the block patterns of the AMX kernels (gemm_amx.cpp, attention_amx.cpp), one thread:
// TFLOP/s of tdpbf16ps on random bf16 tiles, 2 x 2 blocks (C in tmm0-3, A in tmm4-5, B in tmm6-7), NK 32-deep
// steps per block. Patterns (argv[1]):
//   resident   the C tiles stay in the tile registers (no C traffic): the loads and products alone
//   zero       per block: C zeroed, NK steps, the 4 C tiles stored (a block of scores)
//   load       per block: C loaded, NK steps, C stored (an accumulator's round trip)
//   turn-zero  as zero, the stores of one block interleaved with the first step of the next (amx::turn2x2)
//   turn-load  as load, likewise
//   l2-b       resident, B streaming through a 512 KB region (L2) instead of 16 KB (L1)
//   l3-b       resident, B streaming through 2 MB (past L2)
// Build and run (x86-64 with AMX; Linux asks for the tile data permission below):
//   g++ -O2 -march=native -mamx-tile -mamx-bf16 amx_tiles.cpp -o amx_tiles
//   ./amx_tiles PATTERN NK [ITERS]        prints TFLOP/s and ns per tdpbf16ps; take the best of several runs
// notes/cpu_attention_amx.md has the figures of the Sapphire Rapids VM.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kTile = 512;  // bf16 per 16 x 64-byte tile

inline void step(const uint16_t* a, const uint16_t* b) {
  _tile_loadd(4, a, 64);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_loadd(7, b + kTile, 64);
  _tile_dpbf16ps(1, 4, 7);
  _tile_loadd(5, a + kTile, 64);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}
inline void store(float* c) {
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 512, 128);
  _tile_stored(3, c + 528, 128);
}
inline void load(const float* c) {
  _tile_loadd(0, c, 128);
  _tile_loadd(1, c + 16, 128);
  _tile_loadd(2, c + 512, 128);
  _tile_loadd(3, c + 528, 128);
}
// C out to c, the next block's C in (zeroed, or loaded from cn), interleaved with its first step (a, b). (Tile
// numbers are immediates: a macro, not a loop.)
#define PK_RESET(T, off) \
  if (cn)                \
    _tile_loadd(T, cn + (off), 128); \
  else                   \
    _tile_zero(T)
inline void turn(float* c, const float* cn, const uint16_t* a, const uint16_t* b) {
  _tile_stored(0, c, 128);
  PK_RESET(0, 0);
  _tile_loadd(4, a, 64);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_stored(1, c + 16, 128);
  PK_RESET(1, 16);
  _tile_loadd(7, b + kTile, 64);
  _tile_dpbf16ps(1, 4, 7);
  _tile_stored(2, c + 512, 128);
  PK_RESET(2, 512);
  _tile_loadd(5, a + kTile, 64);
  _tile_dpbf16ps(2, 5, 6);
  _tile_stored(3, c + 528, 128);
  PK_RESET(3, 528);
  _tile_dpbf16ps(3, 5, 7);
}
#undef PK_RESET

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s resident|zero|load|turn-zero|turn-load|l2-b|l3-b NK [ITERS]\n", argv[0]);
    return 2;
  }
  const std::string pat = argv[1];
  const int nk = std::atoi(argv[2]);
  const long iters = argc > 3 ? std::atol(argv[3]) : 200000;
  if (nk < 1 || nk > 8 || iters < 1) {
    std::fprintf(stderr, "NK in 1..8, ITERS >= 1\n");
    return 2;
  }
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    std::fprintf(stderr, "no AMX tile data permission from the OS\n");
    return 1;
  }
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));  // not _tile_loadconfig: see amx_common.h
  enum { kResident, kZero, kLoad, kTurnZero, kTurnLoad } mode;
  const size_t big = size_t(1) << 20;  // bf16 values: 2 MB
  const size_t region = pat == "l3-b" ? big : pat == "l2-b" ? size_t(1) << 18 : 0;
  if (pat == "resident" || region) mode = kResident;
  else if (pat == "zero") mode = kZero;
  else if (pat == "load") mode = kLoad;
  else if (pat == "turn-zero") mode = kTurnZero;
  else if (pat == "turn-load") mode = kTurnLoad;
  else {
    std::fprintf(stderr, "unknown pattern '%s'\n", pat.c_str());
    return 2;
  }
  // 64-byte aligned (a tile row across two cache lines loads much slower)
  auto* A = static_cast<uint16_t*>(std::aligned_alloc(64, 32 * 1024 * 2));
  auto* B = static_cast<uint16_t*>(std::aligned_alloc(64, 32 * 1024 * 2));
  auto* BB = static_cast<uint16_t*>(std::aligned_alloc(64, big * 2));
  auto* C = static_cast<float*>(std::aligned_alloc(64, 4 * 4096 * 4));
  uint32_t x = 12345;
  auto rnd = [&] { return x = x * 1664525u + 1013904223u; };
  for (size_t i = 0; i < 32 * 1024; ++i) A[i] = static_cast<uint16_t>(0x3f80 + (rnd() >> 25)), B[i] = A[i] ^ 0x15;
  for (size_t i = 0; i < big; ++i) BB[i] = static_cast<uint16_t>(0x3f80 + (rnd() >> 25));  // bf16 in [1, 2)
  std::memset(C, 0, 4 * 4096 * 4);
  long tdp = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
    const uint16_t* a = A + (it % 8) * 2 * kTile;
    const uint16_t* b = region ? BB + (it * nk * 2 * kTile) % (region - 16 * kTile) : B + (it % 8) * 2 * kTile;
    float* c = C + (it % 4) * 4096;
    const uint16_t* an = A + ((it + 1) % 8) * 2 * kTile;
    const uint16_t* bn = B + ((it + 1) % 8) * 2 * kTile;
    if (mode == kZero) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k = 0; k < nk; ++k) step(a + k * 2 * kTile, b + k * 2 * kTile);
      store(c);
    } else if (mode == kLoad) {
      load(c);
      for (int k = 0; k < nk; ++k) step(a + k * 2 * kTile, b + k * 2 * kTile);
      store(c);
    } else if (mode == kTurnZero || mode == kTurnLoad) {  // step 0 of this block came in with the last turn
      for (int k = 1; k < nk; ++k) step(a + k * 2 * kTile, b + k * 2 * kTile);
      turn(c, mode == kTurnLoad ? C + ((it + 1) % 4) * 4096 : nullptr, an, bn);
    } else {
      for (int k = 0; k < nk; ++k) step(a + k * 2 * kTile, b + k * 2 * kTile);
    }
    tdp += 4 * nk;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  std::free(A), std::free(B), std::free(BB), std::free(C);
  std::printf("%s NK %d: %.2f TFLOP/s, %.1f ns per tdpbf16ps\n", pat.c_str(), nk, tdp * 16.0 * 16 * 32 * 2 / s / 1e12,
              s / tdp * 1e9);
  return 0;
}
