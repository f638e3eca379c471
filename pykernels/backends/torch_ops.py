"""`torch`: the vendor libraries as reached through PyTorch's eager ops: torch.matmul (oneDNN/MKL on
CPU, cuBLAS on CUDA), scaled_dot_product_attention (flash / memory-efficient / cuDNN / math, chosen by
torch), and a decode built from torch ops that reads a paged cache through the block table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.decode import decode_math
from .registry import Backend

_ALL = (torch.float32, torch.float16, torch.bfloat16)


def sdpa(q, k, v, *, causal: bool, scale: float):
    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def decode_ops(q, k_cache, v_cache, context_lens, block_table, *, scale: float):
    # Scores in the input dtype, softmax in float32 as serving stacks do.
    return decode_math(q, k_cache, v_cache, context_lens, block_table, scale=scale, softmax_dtype=torch.float32)


class TorchBackend(Backend):
    name = "torch"
    tier = "vendor"
    devices = ("cpu", "cuda")
    description = "PyTorch eager: matmul (oneDNN/MKL, cuBLAS), scaled_dot_product_attention, torch-ops decode"
    dtypes = {(d, f): _ALL for d in ("cpu", "cuda") for f in ("gemm", "attention", "decode")}

    def gemm(self, a, b):
        return torch.matmul(a, b)

    def attention(self, q, k, v, *, causal, scale):
        return sdpa(q, k, v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return decode_ops(q, k_cache, v_cache, context_lens, block_table, scale=scale)
