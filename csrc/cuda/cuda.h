// Entry points of the CUDA kernels (csrc/cuda/*.cu). Pointers are device pointers; `stream` is a
// cudaStream_t passed as an integer so that this header needs no CUDA include. Every entry point
// checks the launch and throws std::runtime_error naming the kernel on a CUDA error.
#pragma once
#include <cstdint>
#include <string>

#include "common/params.h"

namespace pk::cuda {

void gemm(const GemmParams& p, std::uintptr_t stream);
void attention(const AttentionParams& p, std::uintptr_t stream);
void decode(const DecodeParams& p, std::uintptr_t stream);

// Device of a pointer (-1 if it is not device memory), and a short description of the runtime.
int pointer_device(const void* ptr);
std::string runtime_info();

}  // namespace pk::cuda
