// Scalar conversions between storage types and float, for edges and fallbacks. The vector paths
// widen bf16 in registers (a 16-bit shift) and narrow with round-to-nearest-even like these.
#pragma once
#include <cstdint>
#include <cstring>

namespace pk::cpu {

struct bf16 { uint16_t bits; };

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

template <typename T> inline float load_f(const T* p, int64_t i);
template <> inline float load_f<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load_f<bf16>(const bf16* p, int64_t i) { return bf16_to_float(p[i].bits); }

template <typename T> inline void store_f(T* p, int64_t i, float v);
template <> inline void store_f<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void store_f<bf16>(bf16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }

}  // namespace pk::cpu
