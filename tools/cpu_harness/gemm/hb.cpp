// standalone timing harness: hb M N K dtype(0/2) reps
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "cpu/cpu.h"
#include "cpu/scalar.h"
int main(int argc, char** argv) {
  int64_t M = atoll(argv[1]), N = atoll(argv[2]), K = atoll(argv[3]); int dt = atoi(argv[4]); int reps = argc > 5 ? atoi(argv[5]) : 10;
  size_t es = dt == 0 ? 4 : 2;
  std::vector<char> a(M * K * es + 64), b(K * N * es + 64), c(M * N * es + 64);
  for (size_t i = 0; i < a.size() / 2; ++i) ((uint16_t*)a.data())[i] = 0x3f80 + (rand() & 0x7f);
  for (size_t i = 0; i < b.size() / 2; ++i) ((uint16_t*)b.data())[i] = 0x3f80 + (rand() & 0x7f);
  pk::GemmParams p{a.data(), b.data(), c.data(), M, N, K, dt == 0 ? pk::DType::f32 : pk::DType::bf16};
  pk::cpu::gemm(p); pk::cpu::gemm(p);
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now(); pk::cpu::gemm(p); auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  double t = ts[ts.size() / 2], mn = ts[0];
  printf("M=%ld N=%ld K=%ld dt=%d: median %.3f ms (min %.3f) %.1f GF/s  B %.1f GB/s\n", M, N, K, dt, t * 1e3, mn * 1e3, 2.0 * M * N * K / t / 1e9, double(K) * N * es / t / 1e9);
}
