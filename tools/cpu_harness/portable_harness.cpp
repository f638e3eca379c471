// Correctness harness for the native CPU kernels through their entry points (csrc/cpu/cpu.h), without
// Python: gemm, attention and decode on odd shapes, fp32 and bf16, against a float64 reference.
// Its purpose is the tiers no local machine runs natively: built with Debian's aarch64 cross compiler
// and run under qemu-user (ARCH=aarch64 sh portable.sh) it checks the portable path on aarch64;
// correctness only: qemu timings say nothing about ARM hardware. On x86-64 it runs every tier the CPU
// has (set_isa), or the one named by its first argument. Each case's reference is computed once and every
// tier's output (poisoned with NaN before the call) is compared with it. On an AVX-512 CPU it also checks the
// softmax exponentials (attn_common.h) against std::exp2 (the `math` lines).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/attn_common.h"
#include "cpu/cpu.h"
#include "cpu/probes.h"
#include "cpu/scalar.h"
#include "cpu/vec_portable.h"

using namespace pk;
using namespace pk::cpu;

namespace {

std::mt19937 rng(1234);

// Values rounded to the storage type (so the reference sees exactly what the kernel sees).
struct Buf {
  std::vector<float> f;      // the values
  std::vector<uint16_t> h;   // bf16 storage, when bf16
  bool bf;
  Buf(size_t n, bool bf16, float offset = 0.f) : f(n), h(bf16 ? n : 0), bf(bf16) {
    std::normal_distribution<float> nd(0.f, 1.f);
    for (size_t i = 0; i < n; ++i) {
      float v = nd(rng) + offset;
      if (bf) {
        h[i] = float_to_bf16(v);
        v = bf16_to_float(h[i]);
      }
      f[i] = v;
    }
  }
  void set(size_t i, float v) {  // rounded to the storage type, as the constructor does
    if (bf) {
      h[i] = float_to_bf16(v);
      v = bf16_to_float(h[i]);
    }
    f[i] = v;
  }
  void* ptr() { return bf ? static_cast<void*>(h.data()) : static_cast<void*>(f.data()); }
  float at(size_t i) const { return bf ? bf16_to_float(h[i]) : f[i]; }
};

struct Tally {
  int failures = 0, checks = 0;
};
std::vector<Isa> tiers;  // the tiers under test
Tally tally[8];          // per tier (indexed by Isa)

// Runs `run` on every tier, its output `out` poisoned with NaN first (an element the kernel does not write
// fails), and compares with the float64 reference: max |out - ref| over max |ref|, a NaN anywhere fails.
// The reference is computed once for all tiers (under qemu it costs more than the kernels). Elements with
// skip[i] set (if given) are not compared.
template <class Run>
void each_tier(const char* what, Buf& out, const std::vector<double>& ref, double tol, Run run,
               const std::vector<char>* skip = nullptr) {
  double mref = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (!skip || !(*skip)[i]) mref = std::max(mref, std::fabs(ref[i]));
  for (Isa t : tiers) {
    set_isa(t);
    std::fill(out.f.begin(), out.f.end(), NAN);
    std::fill(out.h.begin(), out.h.end(), uint16_t(0x7fc0));
    run();
    double err = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (skip && (*skip)[i]) continue;
      const double d = std::fabs(out.at(i) - ref[i]);
      if (std::isnan(d)) {  // a NaN anywhere fails, wherever it is (`!(d <= err)` let the next element replace it)
        err = d;
        break;
      }
      err = std::max(err, d);
    }
    Tally& c = tally[static_cast<int>(t)];
    ++c.checks;
    const double rel = err / std::max(mref, 1e-30);
    if (!(rel <= tol)) {
      ++c.failures;
      std::printf("FAIL %s %s: relative error %.3g > %.3g\n", isa_name(t), what, rel, tol);
    }
  }
}

// transb: B stored [N, K] (pk.linear), element (k, n) at b[n * K + k]
void check_gemm(int64_t M, int64_t N, int64_t K, bool bf, bool transb = false) {
  Buf a(M * K, bf), b(K * N, bf, 0.1f), c(M * N, bf);
  GemmParams p{a.ptr(), b.ptr(), c.ptr(), M, N, K, bf ? DType::bf16 : DType::f32};
  p.transb = transb;
  std::vector<double> ref(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double r = 0;
      for (int64_t k = 0; k < K; ++k) r += double(a.f[i * K + k]) * b.f[transb ? j * K + k : k * N + j];
      ref[i * N + j] = r;
    }
  char what[96];
  std::snprintf(what, sizeof what, "gemm M%lld N%lld K%lld %s%s", (long long)M, (long long)N, (long long)K,
                bf ? "bf16" : "fp32", transb ? " transb" : "");
  each_tier(what, c, ref, bf ? 2e-2 : 1e-5, [&] { gemm(p); });
}

// Large logits: scale 1, q = (1, 0, ...) and key j = (8 j, ...), i.e. scores 8 j, up to thousands. Only the true row
// max (of every key the row sees, each tile and block of them) keeps 2^(s - max) finite: a max over part of the keys
// overflows to inf and the output to NaN. (With ordinary scores any reference point works and no check sees it.)
// Sets q; the callers set component 0 of each key row to 8 j.
void large_logit_queries(Buf& q, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t x = 0; x < D; ++x) q.set(r * D + x, x == 0 ? 1.f : 0.f);
}

// poison: a NaN and an inf in the last V row of every kv head (causal): no earlier row may see them, though the
// kernels multiply them by those rows' P of exactly 0 (0 * inf = NaN; attention() recomputes such rows); the last
// rows, which do see them, are not compared.
void check_attention(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, bool causal, bool bf, bool ramp = false,
                     bool poison = false) {
  Buf q(B * Hq * S * D, bf), k(B * Hkv * S * D, bf), v(B * Hkv * S * D, bf, 0.5f), o(B * Hq * S * D, bf);
  const float scale = ramp ? 1.f : 1.f / std::sqrt(float(D));
  if (ramp) {
    large_logit_queries(q, B * Hq * S, D);
    for (int64_t r = 0; r < B * Hkv * S; ++r) k.set(r * D, 8.f * static_cast<float>(r % S));
  }
  std::vector<char> skip;
  if (poison) {
    for (int64_t u = 0; u < B * Hkv; ++u) {
      v.set((u * S + S - 1) * D + 1, NAN);
      v.set((u * S + S - 1) * D + D - 2, INFINITY);
    }
    skip.assign(B * Hq * S * D, 0);
    for (int64_t bh = 0; bh < B * Hq; ++bh) std::fill_n(skip.begin() + ((bh + 1) * S - 1) * D, D, 1);
  }
  const AttentionParams p{q.ptr(), k.ptr(), v.ptr(), o.ptr(), B, Hq, Hkv, S, D, scale, causal,
                          bf ? DType::bf16 : DType::f32};
  std::vector<double> ref(B * Hq * S * D);
  const int64_t g = Hq / Hkv;
  std::vector<double> s(S);
  for (int64_t bh = 0; bh < B * Hq; ++bh)
    for (int64_t i = 0; i < S; ++i) {
      const int64_t kv = (bh / Hq) * Hkv + (bh % Hq) / g, n = causal ? i + 1 : S;
      double mx = -1e300, l = 0;
      for (int64_t j = 0; j < n; ++j) {
        double d = 0;
        for (int64_t x = 0; x < D; ++x) d += double(q.f[(bh * S + i) * D + x]) * k.f[(kv * S + j) * D + x];
        s[j] = d * scale;
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j < n; ++j) l += (s[j] = std::exp(s[j] - mx));
      for (int64_t x = 0; x < D; ++x) {
        double r = 0;
        for (int64_t j = 0; j < n; ++j) r += s[j] * v.f[(kv * S + j) * D + x];
        ref[(bh * S + i) * D + x] = r / l;
      }
    }
  char what[96];
  std::snprintf(what, sizeof what, "attention B%lld Hq%lld Hkv%lld S%lld D%lld%s %s%s%s", (long long)B, (long long)Hq,
                (long long)Hkv, (long long)S, (long long)D, causal ? " causal" : "", bf ? "bf16" : "fp32",
                ramp ? " large logits" : "", poison ? " non-finite last V row" : "");
  each_tier(what, o, ref, bf ? 2e-2 : 1e-4, [&] { attention(p); }, poison ? &skip : nullptr);
}

void check_decode(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t bs, bool paged, bool bf,
                  bool ramp = false) {
  std::vector<int32_t> lens(B), table;
  for (int64_t b = 0; b < B; ++b) lens[b] = static_cast<int32_t>(std::max<int64_t>(1, L - b * L / (B + 1)));
  const int64_t blk = paged ? bs : L, maxb = paged ? (L + bs - 1) / bs : 1, nblk = paged ? B * maxb + 2 : B;
  if (paged) {  // blocks in reverse order, so that a wrong index shows
    table.resize(B * maxb);
    for (int64_t i = 0; i < B * maxb; ++i) table[i] = static_cast<int32_t>(nblk - 1 - i);
  }
  const int64_t rows = nblk * Hkv * blk;
  Buf q(B * Hq * D, bf), k(rows * D, bf), v(rows * D, bf, 0.5f), o(B * Hq * D, bf);
  const float scale = ramp ? 1.f : 1.f / std::sqrt(float(D));
  const DecodeParams p{q.ptr(), k.ptr(), v.ptr(), o.ptr(), lens.data(), paged ? table.data() : nullptr, B, Hq, Hkv, D,
                       nblk, blk, maxb, scale, bf ? DType::bf16 : DType::f32};
  if (ramp) {  // key t of every sequence and kv head at 8 t
    large_logit_queries(q, B * Hq, D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        for (int64_t t = 0; t < lens[b]; ++t) k.set(((decode_block(p, b, t) * Hkv + hk) * blk + t % blk) * D, 8.f * t);
  }
  std::vector<double> ref(B * Hq * D);
  const int64_t g = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / g, n = lens[b];
      auto row = [&](int64_t t) { return ((decode_block(p, b, t) * Hkv + hk) * blk + t % blk) * D; };
      std::vector<double> s(n);
      double mx = -1e300, l = 0;
      for (int64_t t = 0; t < n; ++t) {
        double d = 0;
        for (int64_t x = 0; x < D; ++x) d += double(q.f[(b * Hq + h) * D + x]) * k.f[row(t) + x];
        s[t] = d * scale;
        mx = std::max(mx, s[t]);
      }
      for (auto& e : s) l += (e = std::exp(e - mx));
      for (int64_t x = 0; x < D; ++x) {
        double r = 0;
        for (int64_t t = 0; t < n; ++t) r += s[t] * v.f[row(t) + x];
        ref[(b * Hq + h) * D + x] = r / l;
      }
    }
  char what[112];
  std::snprintf(what, sizeof what, "decode B%lld Hq%lld Hkv%lld L%lld D%lld %s %s%s", (long long)B, (long long)Hq,
                (long long)Hkv, (long long)L, (long long)D, paged ? "paged" : "contig", bf ? "bf16" : "fp32",
                ramp ? " large logits" : "");
  each_tier(what, o, ref, bf ? 2e-2 : 1e-4, [&] { decode(p); });
}

void run_all() {
  for (bool bf : {false, true}) {
    for (auto s : {std::vector<int64_t>{1, 1, 1}, {1, 1000, 65}, {2, 37, 6}, {3, 127, 1025}, {4, 1023, 129}, {7, 63, 127}, {8, 45, 203},
                   {65, 127, 63}, {127, 65, 300}, {200, 300, 513},
                   // few row panels: N split (gemm_cols, and {40, 1100, 600} below), K split (gemm_slabs)
                   {40, 300, 2000}, {40, 150, 3000},
                   // AMX paths (gemm_amx.cpp): the K split (M <= 32; M <= 16 skips the padding tiles),
                   // one row block with several K blocks, row and column blocks
                   {20, 900, 700}, {12, 2048, 1500}, {40, 1100, 600}, {300, 700, 900}})
      for (bool transb : {false, true}) check_gemm(s[0], s[1], s[2], bf, transb);
    check_attention(1, 2, 1, 65, 64, false, bf);
    check_attention(1, 4, 2, 130, 128, true, bf);
    check_attention(2, 3, 3, 17, 64, true, bf);
    check_attention(1, 1, 1, 1, 128, false, bf);
    check_attention(1, 8, 1, 33, 128, true, bf);
    check_attention(2, 4, 2, 97, 64, false, bf);
    // NEON tier (attention_neon.cpp: 12-row micro-blocks, 8-key steps, 64-key tiles, 48-row items): S = 1,
    // S off every block size, just past a row block (49) and a key tile (65), GQA 2/4/8, B > 1, and S = 600
    // (10 key tiles, many row blocks on both threads)
    check_attention(1, 1, 1, 1, 64, true, bf);
    check_attention(2, 2, 1, 13, 128, false, bf);
    check_attention(1, 4, 1, 49, 64, true, bf);
    check_attention(2, 2, 2, 65, 128, true, bf);
    check_attention(1, 8, 2, 600, 64, true, bf);
    check_attention(2, 2, 1, 600, 128, false, bf);
    check_attention(1, 3, 3, 600, 128, true, bf);
    check_decode(1, 1, 1, 1, 64, 16, false, bf);
    check_decode(3, 8, 2, 300, 128, 16, true, bf);
    check_decode(2, 10, 2, 700, 64, 7, true, bf);
    check_decode(1, 6, 2, 1500, 128, 16, false, bf);
    // NEON tier (decode_neon.cpp: quads of heads in the lanes, a padded quad for 2-3 heads, one head alone
    // for g = 1, 5, 9; 32-token tiles, 8-token q.K steps, 4-token P.V steps): g = 1, 2, 4, 7, 8, 32, L = 1,
    // block sizes 1/5/16/32, tails of 1-7 tokens, context splits (2 threads: B*Hkv < 4) with ragged lens
    // where some sequences fit one chunk (L 300 -> 300, 225, 150 against a 256-token chunk)
    check_decode(3, 4, 4, 129, 128, 16, false, bf);
    check_decode(2, 4, 2, 95, 64, 5, true, bf);
    check_decode(2, 8, 2, 333, 64, 16, true, bf);
    check_decode(1, 7, 1, 61, 128, 16, true, bf);
    check_decode(2, 16, 2, 517, 128, 32, true, bf);
    check_decode(2, 8, 2, 1, 128, 16, true, bf);
    check_decode(2, 4, 4, 3, 64, 1, true, bf);
    check_decode(3, 4, 1, 300, 128, 16, false, bf);
    check_decode(1, 4, 1, 3001, 64, 16, false, bf);
    check_decode(1, 32, 1, 3000, 128, 16, true, bf);
    check_decode(1, 9, 1, 1029, 64, 7, true, bf);
    // Head dims the avx2 / neon tiers' own kernels do not take (cpu.h: their attention takes multiples of 32 up to
    // 256, their decode 64 and 128): the portable code; the avx512 / amx attention runs them at D rounded up to 16
    // (AMX bf16: 32) on zero-padded rows (80: a 16-column P.V pass; 5 and 17: a short, a barely longer row). D = 72:
    // a padded row on 16-lane targets; 80: bf16 not in pairs there (80 % 32), pairs on 4 lanes; 40 with a split
    // context (merge over Dp + 2 strides); 256: the widest register blocks of tile_add.
    check_decode(3, 6, 3, 130, 72, 16, false, bf);
    check_decode(2, 8, 2, 300, 80, 16, true, bf);
    check_decode(1, 4, 1, 700, 40, 16, true, bf);
    check_decode(2, 4, 1, 200, 256, 16, true, bf);
    // D = 256 (the portable decode): g = 1, 2, 4, 8, contiguous and paged, a split context
    check_decode(3, 8, 8, 300, 256, 16, false, bf);
    check_decode(1, 4, 2, 700, 256, 16, true, bf);
    check_decode(2, 32, 4, 129, 256, 7, true, bf);
    check_decode(1, 8, 1, 1500, 256, 16, false, bf);
    check_attention(2, 6, 3, 130, 72, true, bf);  // a last key tile of 2
    check_attention(1, 4, 1, 77, 80, false, bf);
    check_attention(1, 2, 2, 300, 40, true, bf);
    check_attention(1, 3, 1, 65, 256, false, bf);
    check_attention(2, 4, 2, 70, 5, true, bf);
    check_attention(1, 3, 3, 129, 17, false, bf);
    check_attention(1, 4, 2, 300, 96, true, bf);    // the tiers' kernels at D 96 (32-column P.V passes), 160, 256
    check_attention(2, 3, 3, 97, 160, false, bf);
    // The portable, avx2 and neon attention pack and run the kv heads a chunk at a time (attn::heads_per_pack; one
    // chunk at these sizes): one head per chunk here, GQA and not, causal and not, bf16 V widened and fp32 V in place
    // or packed (D 72).
    attn::packed_heads_bytes().store(1);
    check_attention(2, 6, 3, 130, 72, true, bf);
    check_attention(2, 4, 2, 97, 64, false, bf);
    check_attention(1, 8, 2, 600, 64, true, bf);
    check_attention(2, 2, 1, 600, 128, false, bf);
    check_attention(1, 3, 3, 17, 128, true, bf);
    attn::packed_heads_bytes().store(attn::kPackedHeadsBytes);
    check_attention(2, 2, 1, 130, 256, true, bf);
    // Large logits: the row max must be the max over every key (see large_logit_queries)
    check_attention(1, 2, 1, 65, 64, false, bf, true);
    check_attention(1, 2, 2, 130, 128, true, bf, true);
    // A non-finite value in a later V row reaches no earlier row (causal)
    check_attention(1, 4, 2, 100, 64, true, bf, false, true);
    check_attention(2, 2, 1, 130, 128, true, bf, false, true);
    check_attention(1, 2, 1, 100, 72, true, bf, false, true);  // the recompute over a padded-row kernel
    check_attention(1, 2, 1, 100, 96, true, bf, false, true);
    check_decode(2, 4, 1, 300, 128, 16, false, bf, true);
    check_decode(2, 8, 2, 95, 64, 32, true, bf, true);
  }
}

#if defined(__x86_64__)
// The AVX-512 softmax exponentials (attn_common.h) against std::exp2 in double: every 2^-12 of [-130, 8] for
// exp2_ps, of [-130, 0] for exp2_neg (its domain), the relative error within each one's stated bound where
// the result is a normal float, exactly 0 below -126 (no denormal results), and -inf -> 0, NaN -> NaN.
// Returns the number of failed checks (0 without AVX-512).
template <class F>
PK_AVX512 int check_exp2(const char* name, F f, double hi, double bound, bool exact_one) {
  double worst = 0;
  int bad = 0;
  for (double x0 = -130; x0 < hi; x0 += 16.0 / 4096) {
    alignas(64) float x[16], y[16];
    for (int i = 0; i < 16; ++i) x[i] = static_cast<float>(std::min(x0 + i / 4096.0, hi));
    _mm512_store_ps(y, f(_mm512_load_ps(x)));
    for (int i = 0; i < 16; ++i) {
      if (x[i] < -126.f) {
        bad += y[i] != 0.f;
        continue;
      }
      const double r = std::exp2(static_cast<double>(x[i])), e = std::fabs(y[i] - r) / r;
      if (!(e <= worst)) worst = e;
    }
  }
  alignas(64) float sp[16] = {-INFINITY, NAN, 0.f, -126.f, -127.f, -150.f, -1e30f};
  alignas(64) float y[16];
  _mm512_store_ps(y, f(_mm512_load_ps(sp)));
  bad += y[0] != 0.f;
  bad += !std::isnan(y[1]);
  if (exact_one) bad += y[2] != 1.f;
  bad += y[4] != 0.f || y[5] != 0.f || y[6] != 0.f;
  bad += !(worst <= bound);
  std::printf("math %s: max relative error %.3g (bound %.3g), 0 below -126 and special values: %s\n", name,
              worst, bound, bad ? "FAIL" : "ok");
  return bad;
}
// Function objects, not lambdas: a captureless lambda's function-pointer thunk passes __m512 by value
// without the AVX-512 target (a -Wpsabi warning in the build without -march=native).
struct Exp2Ps {
  PK_AVX512 __m512 operator()(__m512 x) const { return attn::exp2_ps(x); }
};
template <int Deg> struct Exp2Neg {
  PK_AVX512 __m512 operator()(__m512 x) const { return attn::exp2_neg<Deg>(x); }
};
int check_math() {
  if (!features().avx512f) return 0;
  return check_exp2("exp2_ps", Exp2Ps{}, 8.0, 2.5e-7, true) + check_exp2("exp2_neg<5>", Exp2Neg<5>{}, 0.0, 2.5e-7, true) +
         check_exp2("exp2_neg<3>", Exp2Neg<3>{}, 0.0, 8e-5, false);
}
#else
int check_math() { return 0; }
#endif

// The portable tier's vector math (vec_portable.h), on every architecture: exp2 on [-130, 8] and exp2_neg on its
// domain [-130, 0] as check_exp2 checks the AVX-512 ones (relative error, exactly 0 below -126, -inf -> 0, NaN ->
// NaN, 0 -> 1; exp2 also clamps above), and the lane sum.
template <class F> int check_pv_exp2(const char* name, F f, double hi) {
  constexpr int L = pv::kLanes;
  double worst = 0;
  int bad = 0;
  for (double x0 = -130; x0 < hi; x0 += L / 4096.0) {
    float x[L], y[L];
    for (int i = 0; i < L; ++i) x[i] = static_cast<float>(std::min(x0 + i / 4096.0, hi));
    pv::store(y, f(pv::load(x)));
    for (int i = 0; i < L; ++i) {
      if (x[i] < -126.f) {
        bad += y[i] != 0.f;
        continue;
      }
      const double r = std::exp2(static_cast<double>(x[i])), e = std::fabs(y[i] - r) / r;
      if (!(e <= worst)) worst = e;
    }
  }
  const float sp[8] = {-INFINITY, NAN, 0.f, -127.f, -150.f, -1e30f, 1e30f, 3.f};
  const int nsp = hi > 0 ? 8 : 6;  // exp2_neg: no positive arguments
  for (int k = 0; k < nsp; k += L < 8 ? L : 8) {
    float x[L] = {}, y[L];
    for (int i = 0; i < L && k + i < nsp; ++i) x[i] = sp[k + i];
    pv::store(y, f(pv::load(x)));
    for (int i = 0; i < L && k + i < nsp; ++i) {
      const float v = y[i], s = sp[k + i];
      if (std::isnan(s)) bad += !std::isnan(v);
      else if (s == 0.f) bad += v != 1.f;
      else if (s == 3.f) bad += v != 8.f;
      else if (s > 0.f) bad += !(v == std::exp2(127.f));
      else bad += v != 0.f;
    }
  }
  bad += !(worst <= 2.5e-7);
  std::printf("math pv::%s (%d lanes): max relative error %.3g (bound 2.5e-07), special values: %s\n", name, L, worst,
              bad ? "FAIL" : "ok");
  return bad;
}
int check_pv_math() {
  constexpr int L = pv::kLanes;
  int bad = check_pv_exp2("exp2", [](pv::vf x) { return pv::exp2(x); }, 8.0) +
            check_pv_exp2("exp2_neg", [](pv::vf x) { return pv::exp2_neg(x); }, 0.0);
  float lanes[L];
  for (int i = 0; i < L; ++i) lanes[i] = static_cast<float>(i + 1);
  const int sum_bad = pv::hsum(pv::load(lanes)) != L * (L + 1) / 2.f;
  std::printf("math pv::hsum (%d lanes): %s\n", L, sum_bad ? "FAIL" : "ok");
  return bad + sum_bad;
}

}  // namespace

int main(int argc, char** argv) {
  for (Isa t : kIsas)
    if (isa_supported(t) && (argc < 2 || std::strcmp(argv[1], isa_name(t)) == 0)) tiers.push_back(t);
  run_all();
  int failures = check_math() + check_pv_math();
  // Every compute probe loop this CPU lists runs and counts FLOPs (under qemu: only that it runs; the
  // rate says nothing about hardware).
  for (const std::string& kind : probe_compute_kinds()) {
    const ComputeProbe r = probe_compute(kind, 1, 0.02);
    const bool ok = r.flops > 0 && std::isfinite(r.flops);
    std::printf("probe %s (%s): %s\n", kind.c_str(), r.instruction.c_str(), ok ? "runs" : "FAILED");
    failures += ok ? 0 : 1;
  }
  for (Isa t : tiers) {
    const Tally& c = tally[static_cast<int>(t)];
    std::printf("tier %s: %d of %d checks failed\n", isa_name(t), c.failures, c.checks);
    failures += c.failures;
  }
  return failures == 0 && !tiers.empty() ? 0 : 1;
}
