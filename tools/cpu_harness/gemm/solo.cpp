// The direct path's contention guard: same results on 1 and 2 threads, with the guard forced either way.
// `solo` runs the full shape set (378 cases); `solo small` a smaller one (120 cases, for sanitizer builds).
#include "cpu/gemm.cpp"
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>
using namespace pk; using namespace pk::cpu;
int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "small";
  const std::vector<int64_t> Ms = small ? std::vector<int64_t>{1, 3, 4, 5, 16} : std::vector<int64_t>{1, 2, 3, 4, 5, 16, 29};
  const std::vector<int64_t> Ns = small ? std::vector<int64_t>{1000, 1100} : std::vector<int64_t>{1000, 4096, 4100};
  const std::vector<int64_t> Ks = small ? std::vector<int64_t>{600, 1025} : std::vector<int64_t>{600, 4096, 4097};
  int fails = 0, n = 0;
  std::mt19937 rng(1); std::uniform_real_distribution<float> U(-1.f, 1.f);
  for (int64_t M : Ms) for (int64_t N : Ns) for (int64_t K : Ks) for (int solo : {0, 1, 0}) for (int bf : {0, 1}) {
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
