"""decode: one query token per sequence against a KV cache (contiguous or paged). Problem spec,
FLOP/byte counts, seeded inputs (shuffled blocks, ragged lengths), float64 reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import generator, randn

FAMILY = "decode"


@dataclass(frozen=True)
class DecodeProblem:
    B: int
    Hq: int
    Hkv: int
    context: int          # the longest context length; also the capacity of a contiguous cache
    D: int
    paged: bool = False
    block_size: int = 16
    ragged: bool = False  # per-sequence lengths spread over 1..context (the first one is `context`)
    scale: float | None = None  # None: the API's default 1/sqrt(D)

    family = FAMILY

    def params(self) -> dict:
        p = {"B": self.B, "Hq": self.Hq, "Hkv": self.Hkv, "context": self.context, "D": self.D,
             "paged": self.paged, "block_size": self.block_size if self.paged else None,
             "ragged": self.ragged}
        return p if self.scale is None else {**p, "scale": self.scale}

    def call_kwargs(self) -> dict:
        """Keyword arguments of the API call (and of the reference) that are not tensors."""
        return {} if self.scale is None else {"scale": self.scale}

    def label(self) -> str:
        lay = f"paged{self.block_size}" if self.paged else "contig"
        return (f"B{self.B}-Hq{self.Hq}-Hkv{self.Hkv}-L{self.context}-D{self.D}-{lay}" + ("-ragged" if self.ragged else "")
                + ("" if self.scale is None else f"-scale{self.scale:g}"))

    def context_lens(self) -> list[int]:
        """Deterministic lengths: all `context`, or (ragged) spread evenly from `context` down towards 1."""
        if not self.ragged:
            return [self.context] * self.B
        return [max(1, self.context - (b * self.context) // self.B) for b in range(self.B)]

    def tokens(self) -> int:
        return sum(self.context_lens())

    def flops(self) -> int:
        return 4 * self.Hq * self.D * self.tokens()

    def bytes(self, dtype: torch.dtype) -> int:
        """K and V rows actually used, plus q and the output (block tables and lengths are negligible)."""
        es = torch.tensor([], dtype=dtype).element_size()
        return es * (2 * self.Hkv * self.D * self.tokens() + 2 * self.B * self.Hq * self.D)

    def make_inputs(self, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
        g = generator(seed)
        lens = self.context_lens()
        q = randn((self.B, self.Hq, self.D), g)
        if self.paged:
            bs = self.block_size
            max_blocks = -(-self.context // bs)
            used = [-(-n // bs) for n in lens]
            num_blocks = sum(used) + 3  # a few blocks that no sequence owns
            perm = torch.randperm(num_blocks, generator=g)
            table = torch.zeros(self.B, max_blocks, dtype=torch.int32)
            pos = 0
            for b, nb in enumerate(used):
                table[b, :nb] = perm[pos:pos + nb].to(torch.int32)
                pos += nb
            cache_shape = (num_blocks, self.Hkv, bs, self.D)
        else:
            table = None
            cache_shape = (self.B, self.Hkv, self.context, self.D)
        k = randn(cache_shape, g)
        v = randn(cache_shape, g, offset=0.5)
        out = {
            "q": q.to(device=device, dtype=dtype),
            "k_cache": k.to(device=device, dtype=dtype),
            "v_cache": v.to(device=device, dtype=dtype),
            "context_lens": torch.tensor(lens, dtype=torch.int32, device=device),
            "block_table": None if table is None else table.to(device),
        }
        return out


def gather_cache(cache: torch.Tensor, block_table: torch.Tensor | None) -> torch.Tensor:
    """[B, Hkv, capacity, D] view of either layout; a paged cache is gathered through the block table
    (entries past a sequence's used blocks are clamped into range and then masked by the caller)."""
    if block_table is None:
        return cache
    nb, hkv, bs, d = cache.shape
    idx = block_table.long().clamp(0, nb - 1)
    g = cache[idx]  # [B, max_blocks, Hkv, bs, D]
    return g.permute(0, 2, 1, 3, 4).reshape(idx.shape[0], hkv, idx.shape[1] * bs, d)


def decode_math(q, k_cache, v_cache, context_lens, block_table=None, *, scale: float | None = None,
                compute_dtype: torch.dtype | None = None, softmax_dtype: torch.dtype | None = None):
    """Decode attention from torch ops: gather (paged), q.K^T per GQA group, length mask, softmax, .V."""
    B, Hq, D = q.shape
    dt = compute_dtype or q.dtype
    k = gather_cache(k_cache, block_table).to(dt)
    v = gather_cache(v_cache, block_table).to(dt)
    Hkv, cap = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.to(dt).reshape(B, Hkv, group, D)
    s = (qg @ k.transpose(-1, -2)) * scale  # [B, Hkv, group, cap]
    pos = torch.arange(cap, device=q.device)
    mask = pos[None, :] >= context_lens.to(q.device).long()[:, None]  # [B, cap]
    s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s.to(softmax_dtype or dt), dim=-1).to(dt)
    # Rows past a sequence's length (and blocks it does not own) may hold anything, NaN included:
    # 0 * NaN would leak it into the output, so they are zeroed, not only weighted by zero.
    v = v.masked_fill(mask[:, None, :, None], 0)
    return (p @ v).reshape(B, Hq, D)


def reference(q, k_cache, v_cache, context_lens, block_table=None, *, scale: float | None = None):
    return decode_math(q, k_cache, v_cache, context_lens, block_table, scale=scale, compute_dtype=torch.float64)


def baseline(q, k_cache, v_cache, context_lens, block_table=None, *, scale: float | None = None):
    return decode_math(q, k_cache, v_cache, context_lens, block_table, scale=scale)
