"""Deliberately broken backends for the conformance tests (loaded in the worker via --plugin)."""

import ctypes
import time

import torch

from pykernels.backends.torch_ops import TorchBackend

_CPU_F32 = {("cpu", f): (torch.float32,) for f in ("gemm", "attention", "decode")}


class WrongOnOddShapes(TorchBackend):
    """Right on even shapes; drops the last output column when N is odd, as a tile-edge bug would."""

    name = "wrong_odd"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        c = torch.matmul(a, b)
        if c.shape[1] % 2:
            c[:, -1] = 0
        return c


class CrashOnEdge(TorchBackend):
    """Segfaults when called with M == 1 (the direct edge-shape probe does that)."""

    name = "crash_edge"
    tier = "abstraction"
    dtypes = _CPU_F32

    def gemm(self, a, b):
        if a.shape[0] == 1:
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        return torch.matmul(a, b)


class HangOnTinyAttention(TorchBackend):
    """Never returns for S == 1."""

    name = "hang_tiny"
    tier = "abstraction"
    dtypes = _CPU_F32

    def attention(self, q, k, v, *, causal, scale):
        if q.shape[2] == 1:
            time.sleep(3600)
        return super().attention(q, k, v, causal=causal, scale=scale)
