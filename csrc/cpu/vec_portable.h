// Vectors for the portable tier (no intrinsics): GCC / Clang vector extensions as wide as the build's target
// SIMD (-march=native by default; 16 bytes for a baseline x86-64, aarch64 or other build), which the compiler
// maps to that target's registers, or to scalar code where it has none. Plain loops left to the
// auto-vectorizer were far slower: GCC vectorized the portable GEMM micro-kernel across its rows with
// shuffles (2048^3 fp32 at 14 GFLOP/s on 2 Zen 5 cores, 3% of the AVX-512 FMA peak).
// Header-only; no target attributes: the code takes the translation unit's flags.
#pragma once
#include <cstring>

namespace pk::cpu::pv {

#if defined(__AVX512F__)
#define PK_PV_BYTES 64
#elif defined(__AVX__)
#define PK_PV_BYTES 32
#else
#define PK_PV_BYTES 16
#endif
constexpr int kLanes = PK_PV_BYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(PK_PV_BYTES)));

inline vf load(const float* p) {  // unaligned
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

}  // namespace pk::cpu::pv
