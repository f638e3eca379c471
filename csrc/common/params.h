// Plain-data parameter structs shared by the CPU and CUDA kernels. No pybind11, no torch here:
// csrc/bindings.cpp checks every field once and then hands these to the kernels.
#pragma once
#include <cstdint>

namespace pk {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "unknown";
}

inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// C[M,N] = A[M,K] . B[K,N], all row-major and dense, fp32 accumulation.
struct GemmParams {
  const void* a;
  const void* b;
  void* c;
  int64_t M, N, K;
  DType dtype;
  bool transb = false;  // B stored [N, K] (a linear layer's weight; "NT"): C = A . B^T. CPU only.
};

// O[B,Hq,S,D] = softmax(scale * Q K^T (+ causal mask)) V, with K,V [B,Hkv,S,D]; Hq % Hkv == 0.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t B, Hq, Hkv, S, D;
  float scale;
  bool causal;
  DType dtype;
};

// One query token per sequence against a KV cache.
//   contiguous: k, v [B, Hkv, Lmax, D]; block_table == nullptr; num_blocks == B, block_size == Lmax,
//               max_blocks == 1 (sequence b lives in "block" b).
//   paged:      k, v [num_blocks, Hkv, block_size, D]; block_table [B, max_blocks] int32; token t of
//               sequence b is at block block_table[b*max_blocks + t/block_size], row t % block_size.
// context_lens [B] int32, each in 1 .. max_blocks*block_size. q [B, Hq, D] -> o [B, Hq, D].
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const int32_t* context_lens;
  const int32_t* block_table;
  int64_t B, Hq, Hkv, D;
  int64_t num_blocks, block_size, max_blocks;
  float scale;
  DType dtype;
};

// Block index of token t of sequence b (both layouts).
inline int64_t decode_block(const DecodeParams& p, int64_t b, int64_t t) {
  return p.block_table ? static_cast<int64_t>(p.block_table[b * p.max_blocks + t / p.block_size]) : b;
}

}  // namespace pk
