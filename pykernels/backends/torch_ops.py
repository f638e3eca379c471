"""`torch`: the vendor libraries as reached through PyTorch's eager ops: torch.matmul (oneDNN/MKL on
CPU, cuBLAS on CUDA), scaled_dot_product_attention (flash / memory-efficient / cuDNN / math, chosen by
torch) for prefill and for decode (one query row against the cache with a length mask: what Hugging Face
transformers runs on CPU with attn_implementation="sdpa").

`torch_ops`: decode written as plain torch ops (batched q.K^T, mask, softmax, .V): a baseline of framework
ops, not of a vendor kernel; kept under its own name so that "vs best vendor" is never against it alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.decode import decode_math, gather_cache
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


def decode_sdpa(q, k_cache, v_cache, context_lens, block_table, *, scale: float):
    """One query row per sequence through scaled_dot_product_attention over the cache. A contiguous cache
    whose sequences all fill it is passed as it is (no copy, no mask: what a serving stack with an exactly
    sized cache does); otherwise the paged cache is gathered, the positions past each length are masked,
    and their V rows are zeroed (they may hold anything, NaN included, and 0 * NaN would leak)."""
    B, Hq, D = q.shape
    k = gather_cache(k_cache, block_table)
    v = gather_cache(v_cache, block_table)
    Hkv, cap = k.shape[1], k.shape[2]
    lens = context_lens.to(q.device).long()
    mask = None
    if block_table is not None or bool((lens != cap).any()):
        keep = torch.arange(cap, device=q.device)[None, :] < lens[:, None]  # [B, cap]
        mask = keep[:, None, None, :]
        v = v.masked_fill(~keep[:, None, :, None], 0)
    q4 = q[:, :, None, :]  # [B, Hq, 1, D]
    if Hkv != Hq:
        try:
            o = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            return o.reshape(B, Hq, D)
        except TypeError:  # torch < 2.5 has no enable_gqa
            k = k.repeat_interleave(Hq // Hkv, dim=1)
            v = v.repeat_interleave(Hq // Hkv, dim=1)
    return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=scale).reshape(B, Hq, D)


class TorchBackend(Backend):
    name = "torch"
    tier = "vendor"
    devices = ("cpu", "cuda")
    description = ("PyTorch eager: matmul / F.linear (oneDNN/MKL, cuBLAS), scaled_dot_product_attention (prefill, and decode "
                   "over the cache with a length mask)")
    dtypes = {(d, f): _ALL for d in ("cpu", "cuda") for f in ("gemm", "attention", "decode")}

    def gemm(self, a, b):
        return torch.matmul(a, b)

    def linear(self, x, w):
        # What nn.Linear runs: at M = 1..8 in bf16 on a CPU, oneDNN's NT path is ~2x faster than
        # matmul(x, w.t()) of the same weight stored [K, N] (issue 17: 59 vs 130 ms per 2-layer step).
        return F.linear(x, w)

    def attention(self, q, k, v, *, causal, scale):
        return sdpa(q, k, v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return decode_sdpa(q, k_cache, v_cache, context_lens, block_table, scale=scale)


class TorchOpsBackend(Backend):
    name = "torch_ops"
    tier = "vendor"
    devices = ("cpu", "cuda")
    description = "decode from plain torch ops (batched q.K^T, length mask, softmax, .V): a framework-ops baseline"
    dtypes = {(d, "decode"): _ALL for d in ("cpu", "cuda")}

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return decode_ops(q, k_cache, v_cache, context_lens, block_table, scale=scale)
