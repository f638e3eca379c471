"""The decoder layer built from a backend's kernels: it runs exactly the kernel problems the token report
derives, computes the right thing (against a float64 layer written out here), a decode step continues a
prefill, and the accuracy measurement returns consistent figures."""

from __future__ import annotations

import math

import pytest
import torch

from pykernels.backends import registry
from pykernels.tokens import layer as L
from pykernels.tokens import models

MICRO = models.from_dict(
    {
        "name": "micro",
        "layers": 3,
        "hidden": 128,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "ffn": 160,
        "vocab": 300,
        "context": 40,
    }
)
BACKENDS = ["torch", "native"]
# float32 layers: the kernels' fp32 accumulation differs from float64 by ~1e-6 relative; 1e-4 leaves
# room for the longer reduction of the down projection while catching any wrong rotation or mask.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _need(backend):
    reason = registry.info(registry.all_backends()[backend]).reason
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def reference_layer(ly: L.DecoderLayer, x, past_k=None, past_v=None, start=0):
    """The layer in float64 from plain torch, written independently of pykernels.tokens.layer: x [T, hidden] at
    positions start..start+T-1, attending causally to past K/V [Hkv, start, D] and to itself."""
    m = ly.m
    f = {n: getattr(ly, n).double() for n in ("n1", "n2")}
    f.update({n: getattr(ly, n).double().t() for n in ("w_qkv", "w_o", "w_gu", "w_down")})  # stored [N, K]
    x = x.double()
    T, Hq, Hkv, D = x.shape[0], m.heads, m.kv_heads, m.head_dim

    def norm(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-5) * w

    qkv = (norm(x, f["n1"]) @ f["w_qkv"]).view(T, Hq + 2 * Hkv, D)
    pos = torch.arange(start, start + T, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[:, None] * inv[None, :]  # [T, D/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(t):  # pairs (i, i + D/2) rotated by the angle of i
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    q, k, v = rope(qkv[:, :Hq]), rope(qkv[:, Hq : Hq + Hkv]), qkv[:, Hq + Hkv :]
    if past_k is not None:
        k = torch.cat((past_k.double().transpose(0, 1), k))
        v = torch.cat((past_v.double().transpose(0, 1), v))
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # [S, Hq, D]
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    allowed = torch.arange(k.shape[0])[None, :] <= (start + torch.arange(T))[:, None]
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    x = x + torch.einsum("hts,shd->thd", p, v).reshape(T, Hq * D) @ f["w_o"]
    gu = norm(x, f["n2"]) @ f["w_gu"]
    g, u = gu[:, : m.ffn], gu[:, m.ffn :]
    return x + (g * torch.sigmoid(g) * u) @ f["w_down"]


def _rel(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P,B", [(1, 1), (17, 3), (40, 5)])
def test_layer_runs_the_derived_problems(backend, P, B):
    _need(backend)
    ly = L.DecoderLayer(MICRO, backend)
    wl = models.derive(MICRO, prompt=P, context=P, batch=B)
    x = ly.prefill_input(P)
    pre = ly.record(lambda: ly.prefill(x))
    xd, kc, vc, lens = ly.decode_inputs(B, P)
    dec = ly.record(lambda: ly.decode_step(xd, kc, vc, lens))
    for calls, phase in ((pre, wl.prefill), (dec, wl.decode)):
        per_layer = [(c.role, c.problem) for c in phase.calls if c.role != "lm_head"]
        assert [(r, L.problem_of(f, inp)) for r, f, inp in calls] == per_layer
        assert all(c.count == MICRO.layers for c in phase.calls if c.role != "lm_head")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 23])
def test_prefill_matches_float64_layer(backend, dtype, P):
    _need(backend)
    ly = L.DecoderLayer(MICRO, backend, dtype)
    x = ly.prefill_input(P)
    assert _rel(ly.prefill(x), reference_layer(ly, x)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [1, 39])
def test_decode_step_continues_the_prefill(backend, P):
    """Prefill P tokens, then one decode step for token P+1 against the prompt's cache: the output is the
    reference layer's row for that token (rotary position P, attention to all P+1 keys)."""
    _need(backend)
    ly = L.DecoderLayer(MICRO, backend)
    x = ly.prefill_input(P + 1)
    ly.prefill(x[:P].contiguous())
    k, v = ly.last_kv  # [1, Hkv, P, D]
    m = MICRO
    kc = torch.zeros(1, m.kv_heads, P + 1, m.head_dim)
    vc = torch.zeros_like(kc)
    kc[:, :, :P], vc[:, :, :P] = k, v
    out = ly.decode_step(x[P:].contiguous(), kc, vc, torch.tensor([P + 1], dtype=torch.int32))
    ref = reference_layer(ly, x)[P:]
    assert _rel(out, ref) < TOL[torch.float32]
    assert _rel(out, reference_layer(ly, x[P:], k[0], v[0], start=P)) < TOL[torch.float32]


def test_accuracy_figures_are_consistent():
    ly = L.DecoderLayer(MICRO, "torch")
    for phase in ("prefill", "decode"):
        r = L.accuracy(ly, phase, prompt=16, batch=2, context=16, budget_s=0.01)
        assert r["rounds"] >= 5
        assert r["kernels_s"] == pytest.approx(sum(k["median_s"] for k in r["kernels"]))
        assert r["coverage_p20"] <= r["coverage"] <= r["coverage_p80"]
        assert r["gap"] == pytest.approx(1 - r["coverage"])
        assert r["coverage_min"] == pytest.approx(sum(k["min_s"] for k in r["kernels"]) / r["layer_min_s"])
        assert len(r["kernels"]) == 5


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        L.DecoderLayer(MICRO, "nope")
