"""attention: prefill attention forward. Problem spec, FLOP/byte counts, seeded inputs, float64 reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import generator, randn

FAMILY = "attention"


@dataclass(frozen=True)
class AttentionProblem:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    causal: bool = False
    scale: float | None = None  # None: the API's default 1/sqrt(D)

    family = FAMILY

    def params(self) -> dict:
        p = {"B": self.B, "Hq": self.Hq, "Hkv": self.Hkv, "S": self.S, "D": self.D, "causal": self.causal}
        return p if self.scale is None else {**p, "scale": self.scale}

    def call_kwargs(self) -> dict:
        """Keyword arguments of the API call (and of the reference) that are not tensors."""
        return {"causal": self.causal} if self.scale is None else {"causal": self.causal, "scale": self.scale}

    def label(self) -> str:
        return (f"B{self.B}-Hq{self.Hq}-Hkv{self.Hkv}-S{self.S}-D{self.D}" + ("-causal" if self.causal else "")
                + ("" if self.scale is None else f"-scale{self.scale:g}"))

    def score_pairs(self) -> int:
        """Number of (query, key) pairs that are computed: S*S, or S*(S+1)/2 when causal."""
        return self.S * (self.S + 1) // 2 if self.causal else self.S * self.S

    def flops(self) -> int:
        # Q.K^T and P.V: 2*D FLOPs each per (query, key) pair and query head.
        return 4 * self.B * self.Hq * self.D * self.score_pairs()

    def bytes(self, dtype: torch.dtype) -> int:
        es = torch.tensor([], dtype=dtype).element_size()
        return es * self.B * self.S * self.D * (2 * self.Hq + 2 * self.Hkv)

    def make_inputs(self, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
        g = generator(seed)
        q = randn((self.B, self.Hq, self.S, self.D), g)
        k = randn((self.B, self.Hkv, self.S, self.D), g)
        # V has a per-row offset so that the output is not ~0 and a wrong softmax weighting shows.
        v = randn((self.B, self.Hkv, self.S, self.D), g, offset=0.5)
        return {k_: t.to(device=device, dtype=dtype) for k_, t in (("q", q), ("k", k), ("v", v))}


def attention_math(q, k, v, *, causal: bool, scale: float | None, compute_dtype: torch.dtype | None = None):
    """Plain softmax(Q K^T * scale) V in compute_dtype (default: the input dtype), in chunks of heads so
    that the S x S score matrix of one chunk stays below ~256 MiB."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = compute_dtype or q.dtype
    out = torch.empty(q.shape, dtype=dt, device=q.device)
    es = torch.tensor([], dtype=dt).element_size()
    heads_per_chunk = max(1, (256 << 20) // max(1, S * S * es))
    mask = None
    if causal:
        mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu_(1)
    for b in range(B):
        for h0 in range(0, Hq, heads_per_chunk):
            h1 = min(Hq, h0 + heads_per_chunk)
            kv_idx = torch.arange(h0, h1, device=q.device) // group
            qc = q[b, h0:h1].to(dt)
            kc = k[b].index_select(0, kv_idx).to(dt)
            vc = v[b].index_select(0, kv_idx).to(dt)
            s = (qc @ kc.transpose(-1, -2)) * scale
            if mask is not None:
                s.masked_fill_(mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[b, h0:h1] = _apply_values(p, vc, mask)
    return out


def _apply_values(p: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """p @ v, except that a non-finite value reaches only the queries that attend to it: a masked key
    has weight exactly 0, and 0 * inf must not turn the rows that cannot see it into NaN."""
    finite = torch.isfinite(v)
    if mask is None or bool(finite.all()):
        return p @ v
    out = p @ torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device))
    for h, j, d in (~finite).nonzero().tolist():  # rare: only the robustness probes put inf/NaN in V
        rows = ~mask[:, j]
        out[h, rows, d] = out[h, rows, d] + p[h, rows, j] * v[h, j, d]
    return out


def reference(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    return attention_math(q, k, v, causal=causal, scale=scale, compute_dtype=torch.float64)


def baseline(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    return attention_math(q, k, v, causal=causal, scale=scale)
