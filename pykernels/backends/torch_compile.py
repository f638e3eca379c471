"""`torch_compile`: torch.compile (Inductor) of the `torch` backend's functions. One compiled function
per (family, shapes, dtype, flags), compiled on its first call; the harness makes that call before any
timing, so compilation and autotuning are never timed."""

from __future__ import annotations

import threading

import torch

from .registry import Backend
from .torch_ops import decode_ops, sdpa

_ALL = (torch.float32, torch.float16, torch.bfloat16)


def _gemm(a, b):
    return torch.matmul(a, b)


def _linear(x, w):
    return torch.nn.functional.linear(x, w)


class TorchCompileBackend(Backend):
    name = "torch_compile"
    tier = "abstraction"
    devices = ("cpu", "cuda")
    description = "torch.compile (Inductor) of the torch backend, one compile per shape (dynamic=False)"
    dtypes = {(d, f): _ALL for d in ("cpu", "cuda") for f in ("gemm", "attention", "decode")}

    def __init__(self):
        self._lock = threading.Lock()
        self._compiled: dict = {}

    def availability(self) -> str | None:
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def _fn(self, family, fn):
        with self._lock:
            if family not in self._compiled:
                import torch._dynamo as dynamo

                # Every benchmarked shape is its own specialization; the default limit (8) would make
                # dynamo fall back to eager after a few shapes, and that would be timed as "compiled".
                for knob in ("recompile_limit", "cache_size_limit"):
                    if hasattr(dynamo.config, knob):
                        setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 1024))
                if hasattr(dynamo.config, "accumulated_recompile_limit"):
                    dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 4096)
                self._compiled[family] = torch.compile(fn, dynamic=False, fullgraph=False)
            return self._compiled[family]

    def gemm(self, a, b):
        return self._fn("gemm", _gemm)(a, b)

    def linear(self, x, w):
        return self._fn("linear", _linear)(x, w)

    def attention(self, q, k, v, *, causal, scale):
        return self._fn("attention", sdpa)(q, k, v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self._fn("decode", decode_ops)(q, k_cache, v_cache, context_lens, block_table, scale=scale)
