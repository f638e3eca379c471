// What one core (or each of OMP_NUM_THREADS) reads from memory in a decode kernel's order, with no
// kernel: sums of the 64-byte lines of a K and a V stream (64 MB each per thread, evicted between
// repetitions by writing 1 GB), in one of these orders:
//   tiles      a tile of K rows, then the same tile of V rows (the decode kernels' order); prefetcht1 of
//              the row PFD rows ahead in the same stream (0: none)
//   lines      K and V line by line (two streams at once); HEADS > 1: that many K/V pairs (2 x HEADS streams)
//   cross      a K tile while prefetching the same tile's V, a V tile while prefetching the next K tile
//   touch      a K tile with the tile's V lines loaded beside it, then the V tile again (from L1)
//   pipelined  K rows of tile i + 1 and V rows of tile i in one loop (a software pipeline); prefetcht1 of
//              both PFD rows ahead (0: none)
// WORK: FMAs on 4 chains after each row (tiles, pipelined), standing in for the kernel's compute.
// Build and run (x86-64 with AVX-512):
//   g++ -O2 -march=native -fopenmp read_order.cpp -o read_order
//   OMP_NUM_THREADS=1 ./read_order ORDER ROW_BYTES TILE_ROWS [PFD] [HEADS] [WORK]
// e.g. `./read_order tiles 256 64 64` (bf16 D = 128 rows, 64-row tiles, prefetch one tile ahead).
// Prints GB/s (bytes of K and V read / wall time), best of 3 after a warm-up. notes/cpu_decode.md has the
// figures of the Sapphire Rapids VM.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

volatile float g_sink;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Work {  // WORK dependent FMAs on 4 chains
  __m512 w0 = _mm512_set1_ps(1.f), w1 = w0, w2 = w0, w3 = w0;
  const __m512 m = _mm512_set1_ps(0.999f);
  void run(int n) {
    for (int i = 0; i < n; ++i) {
      w0 = _mm512_fmadd_ps(w0, m, m);
      w1 = _mm512_fmadd_ps(w1, m, m);
      w2 = _mm512_fmadd_ps(w2, m, m);
      w3 = _mm512_fmadd_ps(w3, m, m);
    }
  }
  __m512 sum() const { return _mm512_add_ps(_mm512_add_ps(w0, w1), _mm512_add_ps(w2, w3)); }
};

inline __m512 row_sum(__m512 acc, const char* r, int64_t rowb) {
  for (int64_t c = 0; c < rowb; c += 64) acc = _mm512_add_ps(acc, _mm512_load_ps(reinterpret_cast<const float*>(r + c)));
  return acc;
}
inline void row_prefetch(const char* r, int64_t rowb) {
  for (int64_t c = 0; c < rowb; c += 64) _mm_prefetch(r + c, _MM_HINT_T1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s tiles|lines|cross|touch|pipelined ROW_BYTES TILE_ROWS [PFD] [HEADS] [WORK]\n", argv[0]);
    return 2;
  }
  const std::string order = argv[1];
  const int64_t rowb = std::atoll(argv[2]), tile = std::atoll(argv[3]);
  const int64_t pfd = argc > 4 ? std::atoll(argv[4]) : 0;
  const int heads = argc > 5 ? std::atoi(argv[5]) : 1;
  const int work = argc > 6 ? std::atoi(argv[6]) : 0;
  if (rowb < 64 || rowb % 64 || tile < 1 || pfd < 0 || heads < 1 || work < 0) {
    std::fprintf(stderr, "ROW_BYTES a multiple of 64, TILE_ROWS >= 1, PFD >= 0, HEADS >= 1, WORK >= 0\n");
    return 2;
  }
  const bool same = order == "tiles" && pfd > 0, cross = order == "cross", touch = order == "touch";
  if (!same && !cross && !touch && order != "tiles" && order != "lines" && order != "pipelined") {
    std::fprintf(stderr, "unknown order '%s'\n", order.c_str());
    return 2;
  }
  const int64_t per = int64_t(64) << 20, rows = per / rowb;
  const int64_t pad = (2 * tile + pfd + 1) * rowb;  // the loops read or prefetch up to this far past `per`
  const int T = omp_get_max_threads();
  std::vector<char*> K(size_t(T) * heads), V(size_t(T) * heads);
  for (auto* s : {&K, &V})
    for (auto& p : *s) {
      p = static_cast<char*>(std::aligned_alloc(4096, size_t((per + pad + 4095) / 4096 * 4096)));
      std::memset(p, 1, size_t(per + pad));
    }
  std::vector<char> flush(size_t(1) << 30, 1);
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    std::memset(flush.data(), rep, flush.size());
    const double t0 = now();
#pragma omp parallel
    {
      const int t = omp_get_thread_num();
      const char* kb = K[size_t(t) * heads];
      const char* vb = V[size_t(t) * heads];
      __m512 acc = _mm512_setzero_ps();
      Work w;
      const bool lines = order == "lines", pipelined = order == "pipelined";
      if (lines) {
        for (int64_t off = 0; off < per; off += 64)
          for (int h = 0; h < heads; ++h) {
            acc = _mm512_add_ps(acc, _mm512_load_ps(reinterpret_cast<const float*>(K[size_t(t) * heads + h] + off)));
            acc = _mm512_add_ps(acc, _mm512_load_ps(reinterpret_cast<const float*>(V[size_t(t) * heads + h] + off)));
          }
      } else if (pipelined) {
        for (int64_t r0 = 0; r0 + tile < rows; r0 += tile)
          for (int64_t r = r0; r < r0 + tile; ++r) {
            if (pfd) {
              row_prefetch(kb + (r + tile + pfd) * rowb, rowb);
              row_prefetch(vb + (r + pfd) * rowb, rowb);
            }
            acc = row_sum(acc, kb + (r + tile) * rowb, rowb);
            w.run(work);
            acc = row_sum(acc, vb + r * rowb, rowb);
            w.run(work);
          }
      } else {
        for (int64_t r0 = 0; r0 < rows; r0 += tile) {
          for (int64_t r = r0; r < r0 + tile; ++r) {  // the K tile
            if (same) row_prefetch(kb + (r + pfd) * rowb, rowb);
            if (cross) row_prefetch(vb + r * rowb, rowb);
            acc = row_sum(acc, kb + r * rowb, rowb);
            if (touch) acc = row_sum(acc, vb + r * rowb, rowb);
            w.run(work);
          }
          for (int64_t r = r0; r < r0 + tile; ++r) {  // the V tile
            if (same) row_prefetch(vb + (r + pfd) * rowb, rowb);
            if (cross) row_prefetch(kb + (r + tile) * rowb, rowb);
            acc = row_sum(acc, vb + r * rowb, rowb);
            w.run(work);
          }
        }
      }
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, _mm512_add_ps(acc, w.sum()));
      g_sink = lanes[0] + lanes[15];
    }
    const double s = now() - t0;
    if (rep > 0) best = std::min(best, s);
  }
  std::printf("%s row %lld B, tile %lld, pfd %lld, heads %d, work %d, %d thread(s): %.1f GB/s\n", order.c_str(),
              static_cast<long long>(rowb), static_cast<long long>(tile), static_cast<long long>(pfd), heads, work, T,
              2.0 * double(per) * heads * T / best / 1e9);
  return 0;
}
