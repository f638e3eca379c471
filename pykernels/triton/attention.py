"""attention forward, flash-style: online softmax over K/V tiles, never materializing the S x S scores.

One program owns BLOCK_M query rows of one (batch, query head) and streams the K/V tiles of its kv head
(GQA/MQA: query head h reads kv head h // (Hq // Hkv)). Running row max m and row sum l are kept in
fp32 in the log2 domain (scores pre-multiplied by scale * log2(e), then exp2), and the accumulator is
rescaled by exp2(m_old - m_new) when the max grows.

Causal: tiles entirely above the diagonal are never visited (the loop stops at the query block's last
row), tiles entirely below it run without a mask, and only the BLOCK_M / BLOCK_N tiles that straddle the
diagonal apply the triangular mask. BLOCK_M is a multiple of BLOCK_N so that the split is exact.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from . import FP_FUSION, interpreting

INTERPRETED = interpreting()
LOG2E = 1.4426950408889634


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


# Reductions use Triton's own combine functions (those behind tl.max / tl.sum; present in 3.6 and 3.9)
# when they exist: the interpreter recognizes them and reduces with numpy, while any other combine
# function runs element by element in Python. tl.max / tl.sum themselves cannot be called: they are
# @jit functions decorated when triton.language was imported (compiled mode), which an interpreted
# kernel cannot call (see pykernels/triton/__init__.py). The compiled code is the same either way.
_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_SUM = getattr(tl.standard, "_sum_combine", _sum_combine)


def _gpu_configs():
    # H100: BLOCK_M 128 query rows per program (8 warps for D=128 keeps the 128x128 fp32 accumulator
    # at 64 registers/thread); BLOCK_N 64 or 128 keys per step, 2-4 stages of K/V in shared memory
    # (D=128 fp16, BLOCK_N=128: 64 KB per K+V stage). Unmeasured here; the autotuner picks per
    # (S, D, causal) on the GPU and the choice is recorded.
    c = triton.Config
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        c({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


def _interpreter_configs():
    # 32 query rows x 16 keys: S=65 gives 3 query blocks, diagonal blocks of 2 key tiles, a partial last
    # tile; one config, because autotuning would run the (serial, numpy) kernel once per entry.
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


CONFIGS = _interpreter_configs() if INTERPRETED else _gpu_configs()


# Masks a key tile may need: none (interior tiles), the sequence end (the last tile), or the sequence end
# and the causal triangle (tiles on the diagonal).
MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_SEQ: tl.constexpr = tl.constexpr(1)
MASK_CAUSAL: tl.constexpr = tl.constexpr(2)


@triton.jit
def _attn_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    offs_m,
    offs_d,
    lo,
    hi,
    S,
    qk_scale,
    MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with the key tiles [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_ptrs = offs_n[:, None] * HEAD_D + offs_d[None, :]
        if MASK == MASK_NONE:
            k = tl.load(k_base + kv_ptrs)
        else:
            k = tl.load(k_base + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
        s = s * qk_scale
        if MASK == MASK_SEQ:
            s = tl.where(offs_n[None, :] < S, s, float("-inf"))
        elif MASK == MASK_CAUSAL:
            s = tl.where((offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < S), s, float("-inf"))
        # Every row meets key 0 in the first tile it visits, so m_new is finite from the first tile on and
        # exp2(-inf - m_new) = 0 for the masked entries.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if MASK == MASK_NONE:
            v = tl.load(v_base + kv_ptrs)
        else:
            v = tl.load(v_base + kv_ptrs, mask=offs_n[:, None] < S, other=0.0)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None])
        elif IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            # P in the input dtype for the tensor-core P.V product, as FlashAttention does.
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=CONFIGS, key=["S", "HEAD_D", "CAUSAL"])
@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    S,
    Hq,
    Hkv,
    qk_scale,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The causal split below needs whole key tiles left of each query block's diagonal.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # (b*Hq + h) * S * D overflows int32 past 2**31 elements
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // (Hq // Hkv)
    q_base = q_ptr + pid_bh * S * HEAD_D
    k_base = k_ptr + (b * Hkv + kvh) * S * HEAD_D
    v_base = v_ptr + (b * Hkv + kvh) * S * HEAD_D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    q_mask = offs_m[:, None] < S
    q = tl.load(q_base + offs_m[:, None] * HEAD_D + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, HEAD_D), 0.0, tl.float32)

    if CAUSAL:
        # Key tiles left of this query block's diagonal: every key precedes every query row here (and
        # lies before S), so no mask. Then the diagonal block with the triangular mask; the tiles right
        # of it are fully masked and never visited.
        diag_lo = pid_m * BLOCK_M
        acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, 0, diag_lo, S, qk_scale,
                                    MASK_NONE, UPCAST, IEEE, BLOCK_N, HEAD_D)
        diag_hi = min(diag_lo + BLOCK_M, S)
        acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, diag_lo, diag_hi, S,
                                    qk_scale, MASK_CAUSAL, UPCAST, IEEE, BLOCK_N, HEAD_D)
    else:
        # Whole key tiles without a mask, then the partial last tile (if any) with the sequence-end mask.
        full_hi = (S // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, 0, full_hi, S, qk_scale,
                                    MASK_NONE, UPCAST, IEEE, BLOCK_N, HEAD_D)
        acc, m_i, l_i = _attn_tiles(acc, m_i, l_i, q, k_base, v_base, offs_m, offs_d, full_hi, S, S, qk_scale,
                                    MASK_SEQ, UPCAST, IEEE, BLOCK_N, HEAD_D)

    out = acc / l_i[:, None]
    tl.store(o_ptr + pid_bh * S * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


KERNELS = (_attention_kernel,)

_chosen_lock = threading.Lock()
_chosen: dict[tuple, str] = {}


def _config_str(cfg) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kw}, num_warps={cfg.num_warps}, num_stages={cfg.num_stages}"


def attention(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] (contiguous, same dtype) -> [B, Hq, S, D]."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]), B * Hq)

    _attention_kernel[grid](
        q, k, v, o, S, Hq, Hkv, scale * LOG2E,
        CAUSAL=causal,
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
        HEAD_D=D,
        enable_fp_fusion=FP_FUSION,
    )
    cfg = getattr(_attention_kernel, "best_config", None)
    if cfg is not None:
        with _chosen_lock:
            _chosen[(B, Hq, Hkv, S, D, causal, q.dtype)] = _config_str(cfg)
    return o


def chosen_config(B, Hq, Hkv, S, D, causal, dtype) -> str | None:
    with _chosen_lock:
        return _chosen.get((B, Hq, Hkv, S, D, causal, dtype))
