// PLACEHOLDER -- the CUDA kernel is not written yet.
#include <stdexcept>
#include "cuda/cuda.h"
namespace pk::cuda {
void decode(const DecodeParams& p, std::uintptr_t stream) { throw std::runtime_error("pykernels: the CUDA decode kernel is not implemented yet"); }
}  // namespace pk::cuda
