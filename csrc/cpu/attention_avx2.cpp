// Flash-style attention forward, AVX2 + FMA tier (see cpu.h and attention.cpp for the problem).
// Built with -mavx2 -mfma -mno-avx512f.
//
// Work item = (batch, query head, block of kQb = 48 positions); under a causal mask the heaviest
// (last) blocks go first. Per item, for each tile of kBk = 32 keys:
//   S = Q K^T       2 rows x 4 keys = 8 ymm dot-product accumulators over D (K rows read in place,
//                   no transpose), one transposed horizontal sum (hsum8) per 8 scores
//   online softmax  base 2 (Q pre-scaled by scale * log2 e), fp32
//   O = a O + P V   6 rows x 16 columns = 12 ymm accumulators (the GEMM micro-kernel's shape), fp32
// bf16 K/V tiles are widened to fp32 once per tile (32 x D values, reused by 48 rows); accumulation is
// fp32 throughout. Inputs were checked by csrc/bindings.cpp; head dims 64 and 128.
#include "cpu/cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/attn_common.h"
#include "cpu/scalar.h"
#include "cpu/vec_avx2.h"

namespace pk::cpu {
namespace {

using u16 = uint16_t;
using attn::AlignedBuf;

constexpr int64_t kBk = 32;  // keys per tile: 32 x 128 fp32 = 16 KB of K and of V, in L1/L2
constexpr int64_t kQb = 48;  // query positions per item: each K/V tile feeds 48 rows
static_assert(kBk % 8 == 0 && kQb % 6 == 0, "4-key score groups, 6-row PV blocks");

struct Scratch {
  float *q, *o, *s, *m, *l, *alpha, *kt, *vt;
};

// 2 rows x 4 keys of q . k: lanes [r0k0 r0k1 r0k2 r0k3 | r1k0 r1k1 r1k2 r1k3].
template <int D> inline __m256 scores_2x4(const float* q0, const float* q1, const float* k) {
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int d = 0; d < D; d += 8) {
    const __m256 a0 = _mm256_load_ps(q0 + d), a1 = _mm256_load_ps(q1 + d);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m256 kv = _mm256_loadu_ps(k + u * D + d);
      acc[u] = _mm256_fmadd_ps(a0, kv, acc[u]);
      acc[4 + u] = _mm256_fmadd_ps(a1, kv, acc[4 + u]);
    }
  }
  return avx2::hsum8(acc);
}

// o[r][c0..c0+16) = alpha[r] o[r] + sum_j p[r][j] v[j][c0..), R rows.
template <int R, int D> inline void pv_block(float* o, const float* p, const float* alpha, const float* v, int64_t nj, int c0) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
    acc[r][0] = _mm256_mul_ps(a, _mm256_load_ps(o + r * D + c0));
    acc[r][1] = _mm256_mul_ps(a, _mm256_load_ps(o + r * D + c0 + 8));
  }
  for (int64_t j = 0; j < nj; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * D + c0), v1 = _mm256_loadu_ps(v + j * D + c0 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * kBk + j);
      acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(o + r * D + c0, acc[r][0]);
    _mm256_store_ps(o + r * D + c0 + 8, acc[r][1]);
  }
}

template <int D> void pv_rows(int R, float* o, const float* p, const float* alpha, const float* v, int64_t nj) {
  for (int c0 = 0; c0 < D; c0 += 16) {
    switch (R) {
      case 1: pv_block<1, D>(o, p, alpha, v, nj, c0); break;
      case 2: pv_block<2, D>(o, p, alpha, v, nj, c0); break;
      case 3: pv_block<3, D>(o, p, alpha, v, nj, c0); break;
      case 4: pv_block<4, D>(o, p, alpha, v, nj, c0); break;
      case 5: pv_block<5, D>(o, p, alpha, v, nj, c0); break;
      default: pv_block<6, D>(o, p, alpha, v, nj, c0); break;
    }
  }
}

template <class T, int D>
void item(const AttentionParams& p, int64_t bh, int64_t q0, const Scratch& sc) {
  const int64_t S = p.S, g = p.Hq / p.Hkv, b = bh / p.Hq, hk = (bh % p.Hq) / g;
  const int64_t nq = std::min(kQb, S - q0), nr = (nq + 1) / 2 * 2;  // rows, rounded up to pairs
  const float c = p.scale * attn::kLog2e, ninf = -std::numeric_limits<float>::infinity();
  const T* Q = static_cast<const T*>(p.q) + (bh * S + q0) * D;
  const T* K = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * S * D;
  const T* V = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * S * D;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t rr = std::min(r, nq - 1);  // the pad row repeats the last one
    for (int d = 0; d < D; d += 8) {
      _mm256_store_ps(sc.q + r * D + d, _mm256_mul_ps(avx2::load8(Q + rr * D + d), _mm256_set1_ps(c)));
      _mm256_store_ps(sc.o + r * D + d, _mm256_setzero_ps());
    }
    sc.m[r] = ninf;
    sc.l[r] = 0.f;
  }
  const int64_t kend = p.causal ? q0 + nq : S;
  for (int64_t j0 = 0; j0 < kend; j0 += kBk) {
    const int64_t nj = std::min(kBk, kend - j0), njq = (nj + 3) / 4 * 4;
    const float* kt;
    const float* vt;
    if constexpr (std::is_same_v<T, float>) {
      if (nj == kBk) {
        kt = K + j0 * D;
        vt = V + j0 * D;
      } else {  // a short last tile: copy it, padded with zero rows, so the 4-key groups stay in bounds
        std::fill(sc.kt, sc.kt + kBk * D, 0.f);
        std::copy(K + j0 * D, K + (j0 + nj) * D, sc.kt);
        kt = sc.kt;
        vt = V + j0 * D;
      }
    } else {
      for (int64_t j = 0; j < njq; ++j)
        for (int d = 0; d < D; d += 8) {
          _mm256_store_ps(sc.kt + j * D + d, j < nj ? avx2::load8(K + (j0 + j) * D + d) : _mm256_setzero_ps());
          if (j < nj) _mm256_store_ps(sc.vt + j * D + d, avx2::load8(V + (j0 + j) * D + d));
        }
      kt = sc.kt;
      vt = sc.vt;
    }
    // S = Q K^T, then mask: keys past the tile, and (causal) keys after the row's position.
    for (int64_t r = 0; r < nr; r += 2)
      for (int64_t j = 0; j < njq; j += 4) {
        alignas(32) float t[8];
        _mm256_store_ps(t, scores_2x4<D>(sc.q + r * D, sc.q + (r + 1) * D, kt + j * D));
        for (int u = 0; u < 4; ++u) {
          sc.s[r * kBk + j + u] = t[u];
          sc.s[(r + 1) * kBk + j + u] = t[4 + u];
        }
      }
    for (int64_t r = 0; r < nr; ++r) {
      float* s = sc.s + r * kBk;
      const int64_t lim = p.causal ? std::min(nj, q0 + std::min(r, nq - 1) + 1 - j0) : nj;  // keys < lim
      for (int64_t j = std::max<int64_t>(lim, 0); j < kBk; ++j) s[j] = ninf;
      avx2::online_softmax(s, kBk, sc.m[r], sc.l[r], sc.alpha[r]);
    }
    for (int64_t r = 0; r < nq; r += 6)
      pv_rows<D>(static_cast<int>(std::min<int64_t>(6, nq - r)), sc.o + r * D, sc.s + r * kBk, sc.alpha + r, vt, nj);
  }
  T* O = static_cast<T*>(p.o) + (bh * S + q0) * D;
  for (int64_t r = 0; r < nq; ++r) {
    const __m256 inv = _mm256_set1_ps(1.f / sc.l[r]);
    for (int d = 0; d < D; d += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_load_ps(sc.o + r * D + d), inv);
      if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(O + r * D + d, v);
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(O + r * D + d), avx2::narrow_bf16(v));
      }
    }
  }
}

template <class T, int D> void run(const AttentionParams& p) {
  const int64_t nqb = (p.S + kQb - 1) / kQb, nitems = p.B * p.Hq * nqb;
#pragma omp parallel if (!omp_in_parallel() && nitems > 1)
  {
    constexpr int64_t R = kQb + 1;
    AlignedBuf qb(R * D * 4), ob(R * D * 4), sb(R * kBk * 4), ml(3 * R * 4), kb(kBk * D * 4), vb(kBk * D * 4);
    const Scratch sc{qb.as<float>(), ob.as<float>(), sb.as<float>(), ml.as<float>(), ml.as<float>() + R,
                     ml.as<float>() + 2 * R, kb.as<float>(), vb.as<float>()};
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nitems; ++it) {
      const int64_t bh = it / nqb, qblk = nqb - 1 - it % nqb;  // heaviest (causal) block first
      item<T, D>(p, bh, qblk * kQb, sc);
    }
  }
}

}  // namespace

void attention_avx2(const AttentionParams& p) {
  const bool bf = p.dtype == DType::bf16;
  if (p.dtype != DType::f32 && !bf)
    throw std::invalid_argument(std::string("native cpu attention does not support dtype ") + dtype_name(p.dtype));
  if (p.D == 64) return bf ? run<u16, 64>(p) : run<float, 64>(p);
  if (p.D == 128) return bf ? run<u16, 128>(p) : run<float, 128>(p);
  throw std::invalid_argument("native cpu attention supports head dims 64 and 128, got " + std::to_string(p.D));
}

}  // namespace pk::cpu

#else  // not x86-64: the tier does not exist (isa_supported(avx2) is false), so this is never called

#include <stdexcept>

namespace pk::cpu {
void attention_avx2(const AttentionParams&) { throw std::logic_error("the AVX2 tier exists only on x86-64"); }
}  // namespace pk::cpu
#endif
