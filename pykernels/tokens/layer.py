"""One decoder layer forward (prefill and one decode step) built from a backend's kernels, to check how
well the token report's sum of kernel times predicts a real layer.

The layer is Llama-shaped, as pykernels/models derives it (weights stored [N, K], projections through
the backend's linear): RMSNorm -> QKV GEMM -> rotary embedding ->
causal attention (prefill) or decode attention against a KV cache (decode step) -> O GEMM -> residual ->
RMSNorm -> gate+up GEMM -> SwiGLU -> down GEMM -> residual. The four GEMMs and the attention are the
backend's kernels; everything else is torch (the "small ops": norms, rotary embedding, activation,
residuals, head transposes, the KV-cache write).

The kernels are the backend entry points that pk.prepare resolves: inputs are validated once when the
layer is built, as a serving engine would, and not on every call; the metered kernel times
(pk.prepare(...) callables) exclude per-call validation as well, so the two sides compare like with like.

    python -m pykernels.tokens.layer --model tiny --backend native --backend torch --batch 8 --out results/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..backends import registry
from ..harness import device as _device
from ..harness import timing
from ..kernels import AttentionProblem, DecodeProblem, GemmProblem, dtype_of
from ..kernels._common import dtype_name, generator, randn
from . import models as _models

_EPS = 1e-5
_ROPE_BASE = 10000.0


def _rms_norm(x, w):
    """RMSNorm as Llama's reference code and transformers' LlamaRMSNorm compute it: in fp32, cast back to the
    input's dtype, times the weight: the formulation eager Llama stacks run (F.rms_norm, where torch has it,
    rounds differently in bf16 and dispatches other ops)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS)).to(x.dtype)


def _rope(x, cos, sin):
    """Rotate-half rotary embedding; x [..., T, H, D], cos/sin [T, 1, D]."""
    d = x.shape[-1] // 2
    rot = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return x * cos + rot * sin


class DecoderLayer:
    """Weights and tables of one layer of `model` on `device` in `dtype`; forward passes through `backend`."""

    def __init__(
        self,
        model: _models.ModelConfig,
        backend: str,
        dtype=torch.float32,
        device: str = "cpu",
        seed: int = 0,
        max_positions: int | None = None,
    ):
        self.m, self.dtype, self.device = model, dtype_of(dtype), device
        self.backend = registry.get(backend)
        g = generator(seed)
        h, m = model.hidden, model

        def w(k, n):  # stored [N, K] as a model holds it (pk.linear); scaled so activations stay O(1)
            return randn((n, k), g, scale=1.0 / math.sqrt(k)).to(device=device, dtype=self.dtype)

        self.w_qkv, self.w_o = w(h, m.qkv_width), w(m.heads * m.head_dim, h)
        self.w_gu, self.w_down = w(h, 2 * m.ffn), w(m.ffn, h)
        self.n1 = (1 + 0.1 * randn((h,), g)).to(device=device, dtype=self.dtype)
        self.n2 = (1 + 0.1 * randn((h,), g)).to(device=device, dtype=self.dtype)
        n = max_positions or m.context
        inv = 1.0 / _ROPE_BASE ** (torch.arange(0, m.head_dim, 2, dtype=torch.float64) / m.head_dim)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)[:, None, :]  # [n, 1, D]
        self.cos = ang.cos().to(device=device, dtype=self.dtype)
        self.sin = ang.sin().to(device=device, dtype=self.dtype)
        self.scale = 1.0 / math.sqrt(m.head_dim)
        self.calls: list[tuple[str, str, dict]] | None = None  # (role, family, inputs) while recording
        self.last_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- kernels ------------------------------------------------------------------------------------
    def _gemm(self, role, a, w):
        """A projection: a [M, K] . w^T, w stored [N, K] (pk.linear, the gemm family's layout "nt")."""
        if self.calls is not None:
            self.calls.append((role, "gemm", {"a": a, "b": w, "layout": "nt"}))
        return self.backend.linear(a, w)

    def _attention(self, q, k, v):
        if self.calls is not None:
            self.calls.append(("attention", "attention", {"q": q, "k": k, "v": v, "causal": True}))
        return self.backend.attention(q, k, v, causal=True, scale=self.scale)

    def _decode(self, q, kc, vc, lens):
        if self.calls is not None:
            self.calls.append(
                ("decode", "decode", {"q": q, "k_cache": kc, "v_cache": vc, "context_lens": lens})
            )
        return self.backend.decode(q, kc, vc, lens, None, scale=self.scale)

    # -- forward ------------------------------------------------------------------------------------
    def _mlp(self, x):
        F_ = self.m.ffn
        gu = self._gemm("gate_up", _rms_norm(x, self.n2), self.w_gu)
        act = F.silu(gu[:, :F_]) * gu[:, F_:]
        return x + self._gemm("down", act, self.w_down)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, hidden] (batch 1) -> [P, hidden]."""
        m, P = self.m, x.shape[0]
        Hq, Hkv, D = m.heads, m.kv_heads, m.head_dim
        qkv = self._gemm("qkv", _rms_norm(x, self.n1), self.w_qkv).view(P, Hq + 2 * Hkv, D)
        cos, sin = self.cos[:P], self.sin[:P]
        q = _rope(qkv[:, :Hq], cos, sin).transpose(0, 1).unsqueeze(0).contiguous()
        k = _rope(qkv[:, Hq : Hq + Hkv], cos, sin).transpose(0, 1).unsqueeze(0).contiguous()
        v = qkv[:, Hq + Hkv :].transpose(0, 1).unsqueeze(0).contiguous()
        self.last_kv = (k, v)  # the prompt's KV cache [1, Hkv, P, D], for a decode step to continue from
        a = self._attention(q, k, v)  # [1, Hq, P, D]
        x = x + self._gemm("o", a[0].transpose(0, 1).reshape(P, Hq * D), self.w_o)
        return self._mlp(x)

    def decode_step(self, x: torch.Tensor, k_cache, v_cache, context_lens) -> torch.Tensor:
        """x [B, hidden]: the token at position L-1 of each sequence (L = k_cache.shape[2], all sequences
        at full length); its K and V are written into the cache, then it attends to all L positions."""
        m, B = self.m, x.shape[0]
        Hq, Hkv, D = m.heads, m.kv_heads, m.head_dim
        pos = k_cache.shape[2] - 1
        qkv = self._gemm("qkv", _rms_norm(x, self.n1), self.w_qkv).view(B, Hq + 2 * Hkv, D)
        cos, sin = self.cos[pos], self.sin[pos]
        q = _rope(qkv[:, :Hq], cos, sin)
        k_cache[:, :, pos] = _rope(qkv[:, Hq : Hq + Hkv], cos, sin)
        v_cache[:, :, pos] = qkv[:, Hq + Hkv :]
        a = self._decode(q, k_cache, v_cache, context_lens)  # [B, Hq, D]
        x = x + self._gemm("o", a.view(B, Hq * D), self.w_o)
        return self._mlp(x)

    # -- inputs -------------------------------------------------------------------------------------
    def prefill_input(self, prompt: int, seed: int = 1) -> torch.Tensor:
        return randn((prompt, self.m.hidden), generator(seed)).to(device=self.device, dtype=self.dtype)

    def decode_inputs(self, batch: int, context: int, seed: int = 2) -> tuple:
        m, g = self.m, generator(seed)
        x = randn((batch, m.hidden), g).to(device=self.device, dtype=self.dtype)
        kc = randn((batch, m.kv_heads, context, m.head_dim), g).to(device=self.device, dtype=self.dtype)
        vc = randn((batch, m.kv_heads, context, m.head_dim), g, offset=0.5).to(
            device=self.device, dtype=self.dtype
        )
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        return x, kc, vc, lens

    def record(self, fn) -> list[tuple[str, str, dict]]:
        """The kernel calls (role, family, inputs) one forward makes, validated through pk.prepare."""
        self.calls = []
        try:
            fn()
            calls = self.calls
        finally:
            self.calls = None
        for _, fam, inputs in calls:
            ops.prepare(fam, backend=self.backend, **inputs)  # raises on a shape or dtype the backend refuses
        return calls


def problem_of(family: str, inputs: dict):
    """The problem spec of a recorded kernel call."""
    if family == "gemm":
        (M, K), nt = inputs["a"].shape, inputs.get("layout", "nn") == "nt"
        N = inputs["b"].shape[0] if nt else inputs["b"].shape[1]
        return GemmProblem(M, N, K, layout="nt" if nt else "nn")
    if family == "attention":
        B, Hq, S, D = inputs["q"].shape
        return AttentionProblem(B, Hq, inputs["k"].shape[1], S, D, causal=inputs["causal"])
    B, Hq, D = inputs["q"].shape
    return DecodeProblem(B, Hq, inputs["k_cache"].shape[1], inputs["k_cache"].shape[2], D)


def accuracy(
    layer: DecoderLayer, phase: str, *, prompt: int, batch: int, context: int, budget_s: float = 3.0
) -> dict:
    """Time the layer end to end and each of its kernels alone (pk.prepare callables on the very tensors the
    layer passes) with the harness's timer. On the CPU in paired rounds (timing.time_round_robin_cpu: one
    layer call, then one call of each kernel, per round): the coverage of a round (sum of its kernel times /
    its layer time) is not skewed by another process starting up, and the figure reported is the median over
    rounds. On a GPU each is timed alone (CUDA events) and coverage is the ratio of the medians."""
    if phase == "prefill":
        x = layer.prefill_input(prompt)
        fwd = lambda: layer.prefill(x)
    else:
        x, kc, vc, lens = layer.decode_inputs(batch, context)
        fwd = lambda: layer.decode_step(x, kc, vc, lens)
    calls = layer.record(fwd)
    fns = [ops.prepare(fam, backend=layer.backend, **inp) for _, fam, inp in calls]
    opts = timing.TimingOptions(budget_s=budget_s, min_rounds=5, rse_target=0.005)
    if layer.device.startswith("cuda"):
        st = [timing.time_callable(f, layer.device, opts) for f in (fwd, *fns)]
        cover = [sum(k.median_s for k in st[1:]) / st[0].median_s]
    else:
        st = timing.time_round_robin_cpu([fwd, *fns], opts)
        cover = sorted(sum(k.samples[r] for k in st[1:]) / st[0].samples[r] for r in range(st[0].rounds))
    c = statistics.median(cover)
    kts = [k.median_s for k in st[1:]]
    return {
        "phase": phase,
        "rounds": st[0].rounds,
        "layer_s": st[0].median_s,
        "layer_min_s": st[0].min_s,
        "kernels_s": sum(kts),
        "coverage": c,
        "gap": 1 - c,
        "coverage_p20": timing.percentile(cover, 20),
        "coverage_p80": timing.percentile(cover, 80),
        # Contention only ever adds time: the fastest call of each side is the least disturbed estimate.
        "coverage_min": sum(k.min_s for k in st[1:]) / st[0].min_s,
        "timer": st[0].timer,
        "kernels": [
            {
                "role": r,
                "family": fam,
                "problem": problem_of(fam, inp).label(),
                "median_s": k.median_s,
                "min_s": k.min_s,
            }
            for (r, fam, inp), k in zip(calls, st[1:])
        ],
    }


def to_markdown(doc: dict) -> str:
    load = " / ".join(
        f"{when} {'/'.join(f'{x:.1f}' for x in doc[key])}"
        for when, key in (("before", "load_avg_before"), ("after", "load_avg_after"))
    )
    lines = [
        (
            f"# Layer accuracy: {doc['model']['name']}, prompt {doc['prompt']}, "
            f"decode batch {doc['batch']} at context {doc['context']}"
        ),
        "",
        f"`{doc['command']}`",
        "",
        (
            f"{doc['device_name']}, torch {doc['torch']}, torch threads: {doc['threads']}, "
            f"{doc['datetime']}; load average (1/5/15 min) {load}"
        ),
        "",
        (
            "Coverage = sum of the layer's kernel times / layer time: on the CPU the median over paired "
            "rounds (p20–p80 in brackets), on a GPU the ratio of the medians. Gap = 1 − coverage: the "
            "share of the layer the token report does not meter."
        ),
        "",
        (
            "Two cross-checks: the ratio of the two sides' medians (mixes samples from different moments, "
            "so it swings more when the machine is shared) and the ratio of their fastest calls "
            "(contention only adds time, so minimums are the least disturbed estimate)."
        ),
        "",
        (
            "| backend | dtype | phase | rounds | layer ms | kernels ms | gap | kernels cover "
            "| ratio of medians | ratio of minimums |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['phase']} | {r['rounds']} | {r['layer_s'] * 1e3:.4g} | "
            f"{r['kernels_s'] * 1e3:.4g} | {r['gap'] * 100:+.1f}% | {r['coverage'] * 100:.1f}% "
            f"({r['coverage_p20'] * 100:.0f}–{r['coverage_p80'] * 100:.0f}%) | "
            f"{r['kernels_s'] / r['layer_s'] * 100:.1f}% | {r['coverage_min'] * 100:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `layer` subcommand of pykernels.cli."""
    p = subparsers.add_parser(
        "layer",
        help="one decoder layer end to end vs the sum of its kernel times (token-report accuracy)",
        description=__doc__.split("\n\n")[0],
    )
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pykernels.tokens.layer", description=__doc__.split("\n\n")[0])
    configure_parser(p)
    a = p.parse_args(argv)
    a.argv, a.prog_name = argv, "python -m pykernels.tokens.layer"
    return run(a)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny")
    p.add_argument("--backend", action="append", default=None)
    p.add_argument("--dtype", action="append", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of paired rounds per (backend, phase)")
    p.add_argument("--out", type=Path, default=None, help="JSON result; Markdown beside it (.md)")


def run(a) -> int:
    argv = getattr(a, "argv", None)
    model = _models.load(a.model)
    wl = _models.derive(model, prompt=a.prompt, context=a.context, batch=a.batch)
    results = []
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    for dt in a.dtype or ["float32"]:
        for be in a.backend or ["native", "torch"]:
            layer = DecoderLayer(model, be, dt, a.device, max_positions=max(wl.prompt, wl.context))
            for phase in ("prefill", "decode"):
                r = accuracy(
                    layer, phase, prompt=wl.prompt, batch=wl.batch, context=wl.context, budget_s=a.budget
                )
                r.update(backend=be, dtype=dtype_name(layer.dtype))
                results.append(r)
                print(
                    f"{be:14s} {dt:9s} {phase:8s} layer {r['layer_s'] * 1e3:9.4g} ms  kernels "
                    f"{r['kernels_s'] * 1e3:9.4g} ms  gap {r['gap'] * 100:+6.1f}%  "
                    f"cover {r['coverage'] * 100:5.1f}%",
                    flush=True,
                )
    doc = {
        "model": model.to_dict(),
        "prompt": wl.prompt,
        "context": wl.context,
        "batch": wl.batch,
        "command": " ".join(
            [getattr(a, "prog_name", Path(sys.argv[0]).name)] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "device": a.device,
        "device_name": _device.device_label(_device.fingerprint(a.device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    md = to_markdown(doc)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
