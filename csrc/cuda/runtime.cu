// CUDA runtime helpers shared by the CUDA entry points.
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "cuda/common.cuh"
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

namespace {
constexpr int kMaxDevices = 64;
std::mutex g_mu;
DeviceInfo g_info[kMaxDevices];
bool g_have[kMaxDevices] = {};
std::set<std::pair<const void*, int>> g_smem_set;  // (kernel, device) whose smem limit was raised
}  // namespace

const DeviceInfo& device_info() {
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("pykernels CUDA: device index out of range");
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_have[dev]) {
    DeviceInfo d;
    d.device = dev;
    check(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
          "cudaDeviceGetAttribute");
    g_info[dev] = d;
    g_have[dev] = true;
  }
  return g_info[dev];
}

void ensure_smem(const void* kernel, int bytes, const char* name) {
  const int dev = device_info().device;
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_smem_set.count({kernel, dev})) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), name);
  g_smem_set.insert({kernel, dev});
}

}  // namespace pk::cuda
