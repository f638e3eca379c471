"""decode: one query token per sequence against a KV cache, split-KV ("flash-decoding").

Decode reads the whole KV cache once per step and does 4 FLOPs per byte or less: it is bound by memory
bandwidth, and B * Hkv programs (e.g. 8 x 8 = 64) would leave half of an H100's 132 SMs idle. So the
context is cut into chunks of CHUNK tokens and one program handles one (sequence, kv head, chunk):

1. `_decode_partial_kernel`, grid (B * Hkv, num_chunks): all Hq / Hkv query heads that share the kv head
   at once (GQA: K and V are read once for the whole group), an online softmax over the chunk's tiles of
   BLOCK_N tokens, and an unnormalized partial output plus its running max and sum (fp32, log2 domain).
   Chunks that start past a sequence's own length do nothing (ragged batches cost what they use).
2. `_decode_reduce_kernel`, grid (B * Hq,): rescales the partials of the chunks a sequence used to a
   common max and divides by the total sum.

Paged caches ([num_blocks, Hkv, block_size, D] with a block table) are gathered token by token: token t
of sequence b lives in physical block block_table[b, t // block_size] at row t % block_size, which works
for any block size (1, 7, 16, ...). Only table entries of tokens below the sequence's length are loaded.
The grid size depends only on the cache's capacity, never on the lengths' values, so a call needs no
device-to-host copy and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

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


# Triton's own combine functions when present (3.6, 3.9): the interpreter reduces them with numpy.
# See attention.py for why tl.max / tl.sum cannot be called from an interpreted kernel.
_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_SUM = getattr(tl.standard, "_sum_combine", _sum_combine)


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lens_ptr,
    table_ptr,
    o_part_ptr,
    m_part_ptr,
    l_part_ptr,
    Hq,
    Hkv,
    rows,
    max_blocks,
    num_chunks,
    qk_scale,
    PAGED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # rows: Lmax (contiguous cache) or block_size (paged cache).
    pid_bk = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid_bk // Hkv
    kvh = pid_bk % Hkv
    seq_len = tl.load(lens_ptr + b)
    start = chunk * CHUNK
    end = min(start + CHUNK, seq_len)  # start >= seq_len: an empty loop, nothing stored

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_D)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h  # the query heads that read this kv head
    q_rows = (b * Hq + heads).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * HEAD_D + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0.0, tl.float32)
    acc = tl.full((BLOCK_H, HEAD_D), 0.0, tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < seq_len
        if PAGED:
            page = tl.load(table_ptr + b * max_blocks + offs_n // rows, mask=n_mask, other=0)
            row = (page.to(tl.int64) * Hkv + kvh) * rows + offs_n % rows
        else:
            row = (b * Hkv + kvh).to(tl.int64) * rows + offs_n
        kv_off = row[:, None] * HEAD_D + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # [BLOCK_H, D] x [D, BLOCK_N]: the group's heads padded to 16 rows for tl.dot; decode is
        # bandwidth-bound, so the padded rows cost tensor-core time that is idle anyway.
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
        else:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        # Each visited tile holds at least one token below seq_len, so m_new is finite.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if UPCAST:
            acc = tl.dot(p, v, acc * alpha[:, None])
        elif IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # Partials laid out [B, Hq, num_chunks(, D)]; chunks past the sequence's length are not written and
    # the reduction never reads them.
    part = (b * Hq + heads).to(tl.int64) * num_chunks + chunk
    # Broadcast `start` before comparing: Triton 3.9's interpreter rejects a store mask built with a
    # scalar boolean ("mask has unsupported dtype"); the compiled code is the same.
    used = h_mask & (tl.full((BLOCK_H,), 0, tl.int32) + start < seq_len)
    tl.store(m_part_ptr + part, m_i, mask=used)
    tl.store(l_part_ptr + part, l_i, mask=used)
    tl.store(o_part_ptr + part[:, None] * HEAD_D + offs_d[None, :], acc, mask=used[:, None])


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr,
    m_part_ptr,
    l_part_ptr,
    lens_ptr,
    o_ptr,
    Hq,
    num_chunks,
    CHUNK: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HEAD_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * Hq + h
    b = pid // Hq
    seq_len = tl.load(lens_ptr + b)
    used = (seq_len + CHUNK - 1) // CHUNK
    # The maxima and sums of all chunks at once (at most a few hundred floats) ...
    offs_c = tl.arange(0, CHUNKS_P2)
    m = tl.load(m_part_ptr + pid * num_chunks + offs_c, mask=offs_c < used, other=float("-inf"))
    l = tl.load(l_part_ptr + pid * num_chunks + offs_c, mask=offs_c < used, other=0.0)
    m_all = tl.reduce(m, 0, _MAX)  # finite: chunk 0 is always used (seq_len >= 1)
    l_all = tl.reduce(tl.math.exp2(m - m_all) * l, 0, _SUM)
    # ... and the [chunks, D] partial outputs BLOCK_C chunks at a time, so that the register tile stays
    # BLOCK_C x D however long the context.
    offs_d = tl.arange(0, HEAD_D)
    offs_b = tl.arange(0, BLOCK_C)
    acc = tl.full((HEAD_D,), 0.0, tl.float32)
    for c0 in range(0, used, BLOCK_C):
        cs = c0 + offs_b
        c_mask = cs < used
        part = pid * num_chunks + cs
        w = tl.math.exp2(tl.load(m_part_ptr + part, mask=c_mask, other=float("-inf")) - m_all)
        o = tl.load(o_part_ptr + part[:, None] * HEAD_D + offs_d[None, :], mask=c_mask[:, None], other=0.0)
        acc += tl.reduce(o * w[:, None], 0, _SUM)
    tl.store(o_ptr + pid * HEAD_D + offs_d, (acc / l_all).to(o_ptr.dtype.element_ty))


KERNELS = (_decode_partial_kernel, _decode_reduce_kernel)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(B: int, Hkv: int, capacity: int, D: int, device: torch.device) -> dict:
    """Tile sizes, chunk length and launch parameters for one decode shape (host-side, no device sync)."""
    if INTERPRETED:
        # Small tiles and chunks so that the tests' short contexts span several chunks and tiles.
        block_n, chunk, warps, stages, block_c = 16, 32, 4, 1, 2
    else:
        # H100, unmeasured: 64-token tiles for D=128 (2 x 16 KB of fp16 K+V per stage), 128 for D=64.
        block_n = 64 if D > 64 else 128
        warps, stages, block_c = 4, 3, 16
        # Enough chunks that B * Hkv * chunks covers the SMs about twice (one wave of 2 CTAs/SM), but no
        # chunk shorter than 4 tiles: below that the partials' traffic and the reduction start to show.
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = max(1, -(-2 * sms // (B * Hkv)))
        chunk = -(-capacity // want)
        chunk = max(4 * block_n, -(-chunk // block_n) * block_n)
    num_chunks = -(-capacity // chunk)
    return {"BLOCK_N": block_n, "CHUNK": chunk, "num_chunks": num_chunks, "BLOCK_C": block_c,
            "num_warps": warps, "num_stages": stages}


def decode(q, k_cache, v_cache, context_lens, block_table, *, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; contiguous cache [B, Hkv, Lmax, D] (block_table None) or paged cache
    [num_blocks, Hkv, block_size, D] with block_table [B, max_blocks] int32 -> [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv, rows = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    paged = block_table is not None
    max_blocks = block_table.shape[1] if paged else 1
    capacity = max_blocks * rows if paged else rows
    cfg = plan(B, Hkv, capacity, D, q.device)
    n = cfg["num_chunks"]
    o_part = torch.empty((B, Hq, n, D), dtype=torch.float32, device=q.device)
    m_part = torch.empty((B, Hq, n), dtype=torch.float32, device=q.device)
    l_part = torch.empty((B, Hq, n), dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    _decode_partial_kernel[(B * Hkv, n)](
        q, k_cache, v_cache, context_lens, block_table if paged else context_lens,  # unused when contiguous
        o_part, m_part, l_part,
        Hq, Hkv, rows, max_blocks, n, scale * LOG2E,
        PAGED=paged,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        CHUNK=cfg["CHUNK"],
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
        HEAD_D=D,
        BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )
    _decode_reduce_kernel[(B * Hq,)](
        o_part, m_part, l_part, context_lens, o, Hq, n,
        CHUNK=cfg["CHUNK"],
        CHUNKS_P2=triton.next_power_of_2(n),
        BLOCK_C=cfg["BLOCK_C"],
        HEAD_D=D,
        num_warps=4,
        enable_fp_fusion=FP_FUSION,
    )
    return o
