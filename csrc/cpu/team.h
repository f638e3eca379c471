// Thread teams for the CPU GEMM drivers (gemm.cpp, gemm_amx.cpp): spin-yield-sleep waits (also attention.cpp's) instead
// of OpenMP barriers, a shared ticket for dynamic loops, and a guard that drops short calls to one
// thread while another process holds a core. Header-only; the names live in pk::cpu::team.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace pk::cpu::team {

// ---- threads -----------------------------------------------------------------------------------------
// The threads of one call wait for each other here, not in OpenMP barriers: libgomp's waits spin for
// ~300k pause iterations (several ms on Zen 4) before sleeping, and a spinning waiter keeps its core
// busy, so when the OS has parked its partner behind another process (2 cores, shared VM) the partner
// cannot move over and every barrier costs a scheduler tick (4 ms). Measured, M=1 K=N=4096 fp32 with
// a compiler busy on the other core: 16 ms with OpenMP barriers, 3 ms with spin-then-sleep waits.
// After the first kPauseSpins pauses a waiter yields its core instead of pausing (std::this_thread::yield, which
// returns at once when nothing else is runnable), so that with more threads than cores (a thread count set above
// the cores the process may use) the thread it waits for gets the core. Measured on the 2-core Zen 5 VM with 8
// threads (scratch C++ drivers, pk::cpu::gemm): M = 1, K = N = 4096 bf16 39-40 -> 56-60 GB/s, fp32 M = 4 29 ->
// 46-47, 2048^3 bf16 875-879 -> 942-976 GFLOP/s; with 2 threads level (bf16 M = 1 62.6-71.9 / 64.1-72.5 GB/s over
// six alternations, fp32 75-83 / 76-85; 2048^3 bf16 1023-1025 / 1002-1023), and level with a busy process on one
// of the two cores. The attention's packing waits (attention.cpp) use it too.
constexpr int kPauseSpins = 256;
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(200);
constexpr auto kSleepStep = std::chrono::microseconds(20);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

template <class Pred> void wait_until(Pred done) {
  const auto t0 = std::chrono::steady_clock::now();
  bool sleeping = false;
  for (int spins = 0; !done(); ++spins) {
    if (sleeping) {
      std::this_thread::sleep_for(kSleepStep);
    } else if ((spins & 63) == 63) {
      sleeping = std::chrono::steady_clock::now() - t0 > kSpinBeforeSleep;
    } else if (spins < kPauseSpins) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

// A barrier plus a shared ticket counter for dynamically scheduled loops: `while ((i = grab()) < n)`.
// The ticket starts at 0 and the last thread into a barrier resets it, so a dynamic loop must be the
// team's first or follow a barrier.
class Team {
 public:
  explicit Team(int nt) : nt_(nt) {}
  int64_t grab() { return ticket_.fetch_add(1, std::memory_order_relaxed); }
  void barrier() {
    if (nt_ == 1) {
      ticket_.store(0, std::memory_order_relaxed);
      return;
    }
    const uint32_t g = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == nt_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      ticket_.store(0, std::memory_order_relaxed);
      generation_.store(g + 1, std::memory_order_release);
    } else {
      wait_until([&] { return generation_.load(std::memory_order_acquire) != g; });
    }
  }

 private:
  const int nt_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
  alignas(64) std::atomic<int64_t> ticket_{0};
};

// Runs body(t, nt, team) on nt threads. Bodies end with a Team::barrier, or with thread 0 alone doing
// a last short step, so that nobody spins long in the OpenMP join. If OpenMP gives a smaller team
// (a call from inside a parallel region), thread 0 does all the work alone.
template <class F> void run_team(int nt, F&& body) {
  if (nt <= 1) {
    Team solo(1);
    body(0, 1, solo);
    return;
  }
  Team team(nt);
#pragma omp parallel num_threads(nt)
  {
    if (omp_get_num_threads() == nt) {
      body(omp_get_thread_num(), nt, team);
    } else if (omp_get_thread_num() == 0) {
      Team solo(1);
      body(0, 1, solo);
    }
  }
}

// Contention guard for short calls (gemm.cpp: the memory-bound direct and slabs paths; gemm_amx.cpp).
// On a 2-core VM, when another process holds one of the cores, the partner thread is often started
// late or preempted in the middle of an item, and thread 0 then waits a scheduler tick (4 ms) for it,
// at a barrier or in the OpenMP join. Measured, fp32 M = 1, K = N = 4096 with one busy process beside
// it: 8-12 ms on 2 threads against 2.9 ms on 1 (torch's single-thread GEMV: 3.0-3.3 ms). So thread 0 times its waits
// for the others; when they take more than a quarter of a call (and > 200 us), the next `backoff`
// calls of that path run on one thread, then 2 threads are tried again; the backoff doubles (up to
// kSoloMax) while the waits persist and is reset by a call without them.
struct SoloState {
  std::atomic<int> left{0};  // calls left to run on one thread
  std::atomic<int> backoff{4};
};

class ContentionGuard {
 public:
  static constexpr int kSoloMin = 4, kSoloMax = 256;
  static constexpr auto kMinWait = std::chrono::microseconds(200);
  using clock = std::chrono::steady_clock;
  ContentionGuard(SoloState& s, int nt) : s_(s), nt_(nt) {
    if (nt_ > 1 && s_.left.load(std::memory_order_relaxed) > 0) {
      s_.left.fetch_sub(1, std::memory_order_relaxed);
      nt_ = 1;
    }
  }
  int threads() const { return nt_; }
  // team.barrier(), timed on thread 0.
  void barrier(Team& team, int t) {
    if (t != 0 || nt_ == 1) return team.barrier();
    const auto w0 = clock::now();
    team.barrier();
    waited_ += clock::now() - w0;
  }
  // Thread 0, at the very end of its body.
  void body_done(int t) {
    if (t == 0) done_ = clock::now();
  }
  // After run_team returned: the OpenMP join counts as waiting too.
  ~ContentionGuard() {
    if (nt_ == 1) return;
    const auto end = clock::now();
    waited_ += end - done_;
    if (waited_ > kMinWait && 4 * waited_ > end - start_) {
      const int b = s_.backoff.load(std::memory_order_relaxed);
      s_.left.store(b, std::memory_order_relaxed);
      s_.backoff.store(std::min(2 * b, kSoloMax), std::memory_order_relaxed);
    } else {
      s_.backoff.store(kSoloMin, std::memory_order_relaxed);
    }
  }

 private:
  SoloState& s_;
  int nt_;
  const clock::time_point start_ = clock::now();
  clock::time_point done_ = start_;
  clock::duration waited_{0};
};


}  // namespace pk::cpu::team
