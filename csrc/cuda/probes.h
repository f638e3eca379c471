// Hardware peak probes of a CUDA GPU (csrc/cuda/probes.cu): an fp32 FMA loop, a tensor-core mma.sync
// loop per 16-bit dtype, and read / copy kernels over buffers >= 4x L2. Plain C++ (no CUDA include), so
// csrc/bindings.cpp can include it. Unverified on a GPU: written and compiled (sm_80, sm_90a) on a
// machine without one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pk::cuda {

// Kinds runnable on the current device ([] when no device is present): "fma_fp32", "mma_bf16",
// "mma_fp16" (sm_80+); memory: "read", "copy".
std::vector<std::string> probe_compute_kinds();
std::vector<std::string> probe_memory_kinds();

struct CudaComputeProbe {
  std::string kind, instruction, device_name;
  double flops = 0;                 // FLOP/s of the best trial (a multiply-add = 2 FLOP)
  double seconds = 0;               // wall time of all trials
  int blocks = 0, threads_per_block = 0, accumulators = 0, sm_count = 0;
  int64_t iterations = 0;           // loop iterations per thread per trial
  std::vector<double> trial_seconds;
};

struct CudaMemoryProbe {
  std::string kind, device_name;
  int64_t nbytes = 0;               // bytes per buffer
  double bytes_per_rep = 0;         // read + written
  double gbs = 0;                   // best repetition, 1e9 bytes/s
  std::vector<double> rep_seconds;
};

// Throws std::invalid_argument naming the argument (kind, seconds, nbytes, reps), std::runtime_error on
// CUDA errors. nbytes <= 0: max(1 GiB, 4 x L2).
CudaComputeProbe probe_compute(const std::string& kind, double seconds);
CudaMemoryProbe probe_memory(const std::string& kind, int64_t nbytes, int reps);

}  // namespace pk::cuda
