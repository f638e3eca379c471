// CUDA runtime helpers shared by the CUDA entry points.
#include <cuda_runtime.h>

#include <string>

#include "cuda/cuda.h"

namespace pk::cuda {

int pointer_device(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error
    return -1;
  }
  return (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) ? attr.device : -1;
}

std::string runtime_info() {
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  return "cudart " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
}

}  // namespace pk::cuda
