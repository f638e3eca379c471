// PLACEHOLDER -- the CUDA kernel is not written yet.
#include <stdexcept>
#include "cuda/cuda.h"
namespace pk::cuda {
void attention(const AttentionParams& p, std::uintptr_t stream) { throw std::runtime_error("pykernels: the CUDA attention kernel is not implemented yet"); }
}  // namespace pk::cuda
