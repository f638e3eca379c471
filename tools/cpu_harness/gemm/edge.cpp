// Edge-shape correctness for every path, against a float64 reference. Includes the kernel source
// so the portable and widening paths can be forced.
#include "cpu/gemm.cpp"
#include <cmath>
#include <cstdio>
#include <random>
#include <omp.h>
using namespace pk;
using namespace pk::cpu;
enum Path { kAuto, kPortable, kWiden };
static int failures = 0, cases = 0;
template <class T> void run(Path path, int64_t M, int64_t N, int64_t K, bool nested) {
  std::mt19937 rng(M * 131 + N * 7 + K);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const bool bf = std::is_same_v<T, u16>;
  std::vector<T> a(M * K), b(K * N), c(M * N);
  std::vector<double> af(M * K), bfv(K * N);
  auto gen = [&](std::vector<T>& v, std::vector<double>& d) {
    for (size_t i = 0; i < v.size(); ++i) {
      float x = U(rng) + 0.25f;
      if constexpr (std::is_same_v<T, u16>) { v[i] = float_to_bf16(x); d[i] = bf16_to_float(v[i]); }
      else { v[i] = x; d[i] = x; }
    }
  };
  gen(a, af); gen(b, bfv);
  for (auto& x : c) x = T(0x7fc0);  // garbage
  GemmParams p{a.data(), b.data(), c.data(), M, N, K, bf ? DType::bf16 : DType::f32};
  auto call = [&] {
    if (path == kAuto) gemm(p);
    else if (path == kPortable) { if (M <= kDirectMaxM) gemm_direct_portable<T>(p); else gemm_packed<Portable, T>(p); }
    else gemm_packed<F32Avx512, T>(p);
  };
  if (nested) {
#pragma omp parallel num_threads(2)
    { if (omp_get_thread_num() == 0) call(); }
  } else call();
  ++cases;
  double worst = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double r = 0, s = 0;
      for (int64_t k = 0; k < K; ++k) { r += af[i * K + k] * bfv[k * N + j]; s += std::fabs(af[i * K + k] * bfv[k * N + j]); }
      double v = bf ? bf16_to_float(c[i * N + j]) : double(c[i * N + j]);
      double tol = (2.0 * K * 6e-8 + 1e-6) * s + (bf ? std::ldexp(std::fabs(r), -8) : 0.0) + 1e-30;
      double e = std::fabs(v - r) / tol;
      if (!(e <= 1.0)) e = 1e9;
      worst = std::max(worst, e);
    }
  if (worst > 1.0) { ++failures; printf("FAIL path=%d bf16=%d M=%ld N=%ld K=%ld nested=%d worst=%g\n", path, bf, M, N, K, nested, worst); }
}
int main(int argc, char** argv) {
  const bool big = argc > 1;
  std::vector<int64_t> sz = {1, 7, 63, 64, 65, 127, 1000, 1023, 1025};
  std::vector<int64_t> small = {1, 2, 3, 4, 5, 7, 13, 14, 15, 16, 17, 29, 63, 64, 65, 111, 112, 113, 127};
  for (Path path : {kAuto, kPortable, kWiden}) {
    if (path == kWiden && !features().avx512f) continue;
    for (int64_t M : sz) for (int64_t N : sz) for (int64_t K : sz) {
      if (!big && double(M) * N * K > 2e7) continue;
      if (path != kAuto && double(M) * N * K > 5e7) continue;
      run<float>(path, M, N, K, false); run<u16>(path, M, N, K, false);
    }
    for (int64_t M : small) for (int64_t N : {1, 31, 33, 100}) for (int64_t K : {1, 2, 3, 257, 513, 600}) {
      run<float>(path, M, N, K, false); run<u16>(path, M, N, K, false);
    }
    run<float>(path, 200, 70, 300, true); run<u16>(path, 200, 70, 300, true);
    run<float>(path, 3, 2000, 300, true); run<u16>(path, 16, 2000, 1100, true);
  }
  printf("%d failures of %d cases\n", failures, cases);
  return failures != 0;
}
