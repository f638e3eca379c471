// The direct path's contention guard: same results on 1 and 2 threads, with the guard forced either way.
#include "cpu/gemm.cpp"
#include <cmath>
#include <cstdio>
#include <random>
using namespace pk; using namespace pk::cpu;
int main() {
  int fails = 0, n = 0;
  std::mt19937 rng(1); std::uniform_real_distribution<float> U(-1.f, 1.f);
  for (int64_t M : {1, 3, 4, 5, 16}) for (int64_t N : {1000, 1100}) for (int64_t K : {600, 1025}) for (int solo : {0, 1, 0}) for (int bf : {0, 1}) {
    std::vector<float> a(M * K), b(K * N), c(M * N, NAN); std::vector<u16> ah(M * K), bh(K * N), ch(M * N, 0x7fc0);
    for (auto& x : a) x = U(rng); for (auto& x : b) x = U(rng);
    for (size_t i = 0; i < a.size(); ++i) { ah[i] = float_to_bf16(a[i]); if (bf) a[i] = bf16_to_float(ah[i]); }
    for (size_t i = 0; i < b.size(); ++i) { bh[i] = float_to_bf16(b[i]); if (bf) b[i] = bf16_to_float(bh[i]); }
    g_solo_direct.left.store(solo); g_solo_slabs.left.store(solo);
    GemmParams p = bf ? GemmParams{ah.data(), bh.data(), ch.data(), M, N, K, DType::bf16} : GemmParams{a.data(), b.data(), c.data(), M, N, K, DType::f32};
    gemm(p);
    double worst = 0;
    for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) {
      double r = 0, s = 0;
      for (int64_t k = 0; k < K; ++k) { r += double(a[i * K + k]) * b[k * N + j]; s += std::fabs(double(a[i * K + k]) * b[k * N + j]); }
      const double v = bf ? bf16_to_float(ch[i * N + j]) : c[i * N + j];
      const double tol = (2 * K * 6e-8 + 1e-6) * s + (bf ? std::ldexp(std::fabs(r), -8) : 0);
      double e = std::fabs(v - r) / tol; if (!(e <= 1)) e = 1e9; worst = std::max(worst, e);
    }
    ++n; if (worst > 1) { ++fails; printf("FAIL M=%ld N=%ld K=%ld solo=%d bf=%d worst=%g\n", M, N, K, solo, bf, worst); }
  }
  printf("%d failures of %d\n", fails, n); return fails != 0;
}
