// Hardware peak probes of the CPU (csrc/cpu/probes.cpp): what the silicon can do, as the denominator of
// every "% of peak" (pykernels/harness/device.py). Plain data in and out; csrc/bindings.cpp checks the
// arguments (kind known and runnable here, threads, seconds, nbytes, reps) and turns these structs into
// dicts. An argument that slips through unchecked throws std::invalid_argument (a ValueError in Python).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pk::cpu {

// Compute probe kinds this CPU and OS can run ("avx512_fp32", "avx2_fp32", "avx512_bf16", "avx512_fp16",
// "amx_bf16", "neon_fp32"), fastest-per-dtype first; and every kind this build knows of.
std::vector<std::string> probe_compute_kinds();
std::vector<std::string> probe_compute_known();
// STREAM-style kinds: "read", "copy", "triad", "copy_nt".
std::vector<std::string> probe_memory_kinds();

struct ComputeProbe {
  std::string kind;
  std::string instruction;       // e.g. "vfmadd231ps zmm"
  int threads = 0;
  int accumulators = 0;          // independent dependency chains per thread
  double flop_per_instruction = 0;
  double flops = 0;              // FLOP/s of the best trial, all threads (a multiply-add = 2 FLOP)
  // Sum over threads of each thread's FLOP per second of its own CPU time (best trial): what the cores do
  // while they run; stays right on a machine shared with other processes (pykernels/harness/device.py
  // takes the larger of this and `flops` as the CPU peak).
  double flops_cpu_time = 0;
  double seconds = 0;            // wall time spent in the timed trials
  uint64_t iterations = 0;       // loop iterations per thread per trial
  std::vector<double> trial_seconds;
};

struct MemoryProbe {
  std::string kind;
  int64_t nbytes = 0;            // bytes per array (rounded down to a multiple of 64)
  int arrays = 0;                // arrays allocated (2 or 3)
  double bytes_per_rep = 0;      // bytes read + written per repetition, as STREAM counts them
  int threads = 0;
  double gbs = 0;                // best repetition, 1e9 bytes/s
  std::vector<double> rep_seconds;
  std::string store;             // "non-temporal (avx512)" / "regular" ...
};

struct ClockProbe {
  double ghz = 0;                // mean over threads of each thread's best trial (by its own CPU time)
  double ghz_wall = 0;           // the same by wall time (low when other processes share the cores)
  double ghz_min = 0, ghz_max = 0;
  std::vector<double> per_thread_ghz;
  int threads = 0;
  int chain = 0;                 // dependent adds per loop iteration
};

// threads <= 0: omp_get_max_threads() (what the kernels use). seconds: total time of the timed trials.
ComputeProbe probe_compute(const std::string& kind, int threads, double seconds);
// nbytes <= 0: max(256 MiB, 4 x the last-level cache).
MemoryProbe probe_memory(const std::string& kind, int64_t nbytes, int threads, int reps);
ClockProbe probe_clock(int threads);
// The "read" probe over an array allocated and first-touched once (nbytes <= 0: probe_memory's default
// size): run() reads it once on `threads` threads and returns the wall seconds. For timing the read
// bandwidth in the same rounds as a kernel; probe_memory allocates and touches its arrays on every call.
class ReadPass {
 public:
  ReadPass(int64_t nbytes, int threads);
  ~ReadPass();
  ReadPass(const ReadPass&) = delete;
  ReadPass& operator=(const ReadPass&) = delete;
  int64_t nbytes() const;
  double run() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A compute probe's loop with a fixed amount of work, calibrated once so that one run takes about
// `seconds` on a thread: run() executes it once on `threads` threads and returns the wall seconds; flop() is
// the work of one run, all threads together. For timing the compute peak in the same rounds as a kernel
// (tools/issue6.py), as ReadPass does for the read bandwidth.
class ComputePass {
 public:
  ComputePass(const std::string& kind, int threads, double seconds);
  const std::string& kind() const { return kind_; }
  int threads() const { return threads_; }
  double flop() const { return flop_; }
  double run() const;

 private:
  std::string kind_;
  void (*fn_)(uint64_t) = nullptr;
  uint64_t iters_ = 0;
  int threads_ = 0;
  double flop_ = 0;
};

// Default array size of probe_memory, the last-level cache size the library sees (0 when unknown), and
// the physical memory (bytes, 0 when unknown), for argument checks.
int64_t probe_memory_default_bytes();
int64_t llc_bytes();
int64_t physical_memory_bytes();

// Thread count of the native kernels (omp_set_num_threads on the calling thread).
void set_num_threads(int n);

}  // namespace pk::cpu
