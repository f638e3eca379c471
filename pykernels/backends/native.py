"""`native`: this repo's hand-written kernels: C++ (csrc/cpu) on CPU tensors, CUDA C++ (csrc/cuda) on
CUDA tensors, through the private extension pykernels._C (raw pointers + sizes + stream)."""

from __future__ import annotations

import torch

from .registry import Backend

_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)


def _ext():
    from .. import _C

    return _C


def _dev(t: torch.Tensor) -> tuple[int, int]:
    """(device code, stream) for the binding."""
    if t.device.type == "cuda":
        return 1, torch.cuda.current_stream(t.device).cuda_stream
    return 0, 0


class NativeBackend(Backend):
    name = "native"
    tier = "native"
    devices = ("cpu", "cuda")
    description = "hand-written C++ (AVX-512/AVX512-BF16, OpenMP) on CPU and CUDA C++ on NVIDIA GPUs"
    dtypes = {
        ("cpu", "gemm"): _CPU_DTYPES,
        ("cpu", "attention"): _CPU_DTYPES,
        ("cpu", "decode"): _CPU_DTYPES,
        ("cuda", "gemm"): _CUDA_DTYPES,
        ("cuda", "attention"): _CUDA_DTYPES,
        ("cuda", "decode"): _CUDA_DTYPES,
    }

    def availability(self) -> str | None:
        try:
            _ext()
        except ImportError as e:
            return f"the extension pykernels._C did not import ({e}); reinstall with `pip install -e .`"
        return None

    def supports(self, family, device_type, dtype, **shape):
        reason = super().supports(family, device_type, dtype, **shape)
        if reason:
            return reason
        if device_type == "cuda" and not _ext().has_cuda:
            return ("backend 'native' was built without CUDA (no CUDA compiler at build time); rebuild with "
                    "PYKERNELS_CUDA=ON on a machine with nvcc")
        if family == "gemm" and shape.get("layout", "nn") == "nt" and device_type == "cuda":
            return ("backend 'native' implements linear (gemm layout 'nt', b stored [N, K]) on CPU only; the "
                    "CUDA GEMM reads B as [K, N]")
        d = shape.get("D")
        if family in ("attention", "decode") and d is not None and d not in HEAD_DIMS:
            return f"backend 'native' supports head dims {HEAD_DIMS} for {family}, got D={d}"
        return None

    def gemm(self, a, b):
        M, K = a.shape
        N = b.shape[1]
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)
        dev, stream = _dev(a)
        _ext().gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, _DT_CODE[a.dtype], dev, stream)
        return c

    def linear(self, x, w):
        M, K = x.shape
        N = w.shape[0]
        c = torch.empty((M, N), dtype=x.dtype, device=x.device)
        dev, stream = _dev(x)
        _ext().gemm(x.data_ptr(), w.data_ptr(), c.data_ptr(), M, N, K, _DT_CODE[x.dtype], dev, stream, transb=True)
        return c

    def attention(self, q, k, v, *, causal, scale):
        B, Hq, S, D = q.shape
        o = torch.empty_like(q)
        dev, stream = _dev(q)
        _ext().attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), B, Hq, k.shape[1], S, D,
                         scale, causal, _DT_CODE[q.dtype], dev, stream)
        return o

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        B, Hq, D = q.shape
        o = torch.empty_like(q)
        dev, stream = _dev(q)
        if block_table is None:
            num_blocks, block_size, max_blocks, bt = B, k_cache.shape[2], 1, 0
        else:
            num_blocks, block_size, max_blocks, bt = (k_cache.shape[0], k_cache.shape[2], block_table.shape[1],
                                                      block_table.data_ptr())
        _ext().decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr(), context_lens.data_ptr(),
                      bt, B, Hq, k_cache.shape[1], D, num_blocks, block_size, max_blocks, scale,
                      _DT_CODE[q.dtype], dev, stream)
        return o
