"""Deliberately broken backends for the conformance tests (loaded in the worker via --plugin)."""

import ctypes
import os
import time

import torch

from pykernels.backends.torch_ops import TorchBackend
from pykernels.kernels.attention import baseline as attention_baseline

_CPU_F32 = {("cpu", f): (torch.float32,) for f in ("gemm", "attention", "decode")}


class _Base(TorchBackend):
    """The torch backend, with attention from plain torch ops: torch 2.13's CPU scaled_dot_product_attention
    returns NaN for causal=True with a negative scale, and each broken backend here must carry only its own bug."""

    def attention(self, q, k, v, *, causal, scale):
        return attention_baseline(q, k, v, causal=causal, scale=scale)


class WrongOnOddShapes(_Base):
    """Right on even shapes; drops the last output column when N is odd, as a tile-edge bug would."""

    name = "wrong_odd"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        c = torch.matmul(a, b)
        if c.shape[1] % 2:
            c[:, -1] = 0
        return c


class CrashOnEdge(_Base):
    """Segfaults when called with M == 1 (the direct edge-shape probe does that)."""

    name = "crash_edge"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        if a.shape[0] == 1:
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        return torch.matmul(a, b)


class HangOnTinyAttention(_Base):
    """Never returns for S == 1."""

    name = "hang_tiny"
    tier = "abstraction"
    dtypes = _CPU_F32

    def attention(self, q, k, v, *, causal, scale):
        if q.shape[2] == 1:
            time.sleep(3600)
        return super().attention(q, k, v, causal=causal, scale=scale)


class IgnoresScale(_Base):
    """Always uses the default 1/sqrt(D), whatever scale the caller passes."""

    name = "ignores_scale"
    tier = "abstraction"
    dtypes = _CPU_F32

    def attention(self, q, k, v, *, causal, scale):
        return super().attention(q, k, v, causal=causal, scale=1.0 / q.shape[-1] ** 0.5)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return super().decode(q, k_cache, v_cache, context_lens, block_table, scale=1.0 / q.shape[-1] ** 0.5)


class ModifiesInputs(_Base):
    """Scales q in place (saving a temporary) and returns a correct output."""

    name = "modifies_inputs"
    tier = "abstraction"
    dtypes = _CPU_F32

    def attention(self, q, k, v, *, causal, scale):
        q.mul_(scale)
        return super().attention(q, k, v, causal=causal, scale=1.0)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        q.mul_(scale)
        return super().decode(q, k_cache, v_cache, context_lens, block_table, scale=1.0)

    def gemm(self, a, b):
        c = torch.matmul(a, b)
        a.zero_()  # "frees" a as a workspace
        return c


class _Memo:
    def __init__(self):
        self.memo = {}

    def key(self, name, *tensors):
        return (name, *(None if t is None else (tuple(t.shape), t.dtype) for t in tensors))


class MemoizesByShape(_Base):
    """Returns the output it computed the first time it saw a shape (a stale-cache bug)."""

    name = "memoizes"
    tier = "abstraction"
    dtypes = _CPU_F32

    def __init__(self):
        super().__init__()
        self._m = _Memo()

    def _cached(self, key, fn):
        if key not in self._m.memo:
            self._m.memo[key] = fn()
        return self._m.memo[key].clone()

    def gemm(self, a, b):
        return self._cached(self._m.key("gemm", a, b), lambda: torch.matmul(a, b))

    def attention(self, q, k, v, *, causal, scale):
        return self._cached(self._m.key("attention", q, k, v) + (causal, scale),
                            lambda: _Base.attention(self, q, k, v, causal=causal, scale=scale))

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self._cached(self._m.key("decode", q, k_cache, block_table) + (scale,),
                            lambda: TorchBackend.decode(self, q, k_cache, v_cache, context_lens, block_table,
                                                        scale=scale))


class RightOnlyOnFirstCall(_Base):
    """Right on the first call of each shape; later calls skip a (pretended) workspace reset and drift."""

    name = "first_call_only"
    tier = "abstraction"
    dtypes = _CPU_F32

    def __init__(self):
        super().__init__()
        self._seen = set()

    def gemm(self, a, b):
        c = torch.matmul(a, b)
        key = (tuple(a.shape), tuple(b.shape))
        if key in self._seen:
            c = c * 1.01
        self._seen.add(key)
        return c


class AbortOnShape(_Base):
    """Aborts the process (SIGABRT, as a failed assertion in C++ would) on a GEMM with M == 1 and N odd > 64
    (the smoke sweep's M1-N65-K63; the conformance case M1-N129-K1), and ignores the caller's scale."""

    name = "abort_m1"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        if a.shape[0] == 1 and b.shape[1] > 64 and b.shape[1] % 2:
            os.abort()
        return torch.matmul(a, b)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return super().decode(q, k_cache, v_cache, context_lens, block_table, scale=1.0 / q.shape[-1] ** 0.5)


class HangOnShape(_Base):
    """Never returns for a GEMM with M == 33 (a deadlock in a Python-level scheduler)."""

    name = "hang_m33"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        if a.shape[0] == 33:
            time.sleep(3600)
        return torch.matmul(a, b)


class ReturnsInput(_Base):
    """Writes the attention output into q's buffer and returns q (saves an allocation; the caller's q is gone)."""

    name = "returns_input"
    tier = "abstraction"
    dtypes = _CPU_F32

    def attention(self, q, k, v, *, causal, scale):
        return q.copy_(super().attention(q, k, v, causal=causal, scale=scale))
