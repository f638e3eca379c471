"""`native`: this repo's hand-written kernels: C++ (csrc/cpu) on CPU tensors, CUDA C++ (csrc/cuda) on
CUDA tensors, through the private extension pykernels._C (raw pointers + sizes + stream)."""

from __future__ import annotations

import torch

from .registry import Backend

_DT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)  # the CUDA kernels'; on CPU any D (the tier's kernels or portable code: describe_call)


_ext_module = None


def _ext():
    global _ext_module
    if _ext_module is None:  # an import statement per call costs ~0.3 us of a 16^3 GEMM
        from .. import _C
        from ..harness import tune

        tune.apply_cached(_C)  # this machine's `pykernels tune` result, if any (once per process)
        _ext_module = _C
    return _ext_module


def _dev(t: torch.Tensor) -> tuple[int, int]:
    """(device code, stream) for the binding."""
    if t.is_cuda:  # not t.device.type: that builds a device object (~0.2-0.7 us of a 16^3 GEMM)
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
        if family in ("attention", "decode") and d is not None and d not in HEAD_DIMS and device_type != "cpu":
            # on CPU any head dim: the portable kernel for one the tier's kernels lack (describe_call records it)
            return f"backend 'native' supports head dims {HEAD_DIMS} for {family} on CUDA (any on CPU), got D={d}"
        return None

    def prepare(self, family, **kw):
        """On CPU: the output allocated once and the checked pointers bound in C++ (pykernels._C.prepare_*),
        so the timed call is one call of that function. On CUDA the family method as is: the stream is the
        current one at each call (the CUDA timer captures calls in a graph on a stream of its own)."""
        first = kw["a"] if family == "gemm" else kw.get("q")
        if first is None or first.device.type != "cpu":
            return super().prepare(family, **kw)
        ext = _ext()
        if family == "gemm":
            a, b = kw["a"], kw["b"]
            nt = kw.get("layout", "nn") == "nt"  # pk.linear: b stored [N, K]
            (M, K), N = a.shape, b.shape[0 if nt else 1]
            c = torch.empty((M, N), dtype=a.dtype)
            return ext.prepare_gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, _DT_CODE[a.dtype], out=c,
                                    keep=(a, b), transb=nt)
        if family == "attention":
            q, k, v = kw["q"], kw["k"], kw["v"]
            B, Hq, S, D = q.shape
            o = torch.empty_like(q)
            return ext.prepare_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), B, Hq, k.shape[1],
                                         S, D, kw["scale"], kw["causal"], _DT_CODE[q.dtype], out=o, keep=(q, k, v))
        if family == "decode":
            q, kc, vc, lens, bt = kw["q"], kw["k_cache"], kw["v_cache"], kw["context_lens"], kw["block_table"]
            o = torch.empty_like(q)
            return ext.prepare_decode(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), o.data_ptr(), lens.data_ptr(),
                                      *_decode_layout(q, kc, bt), kw["scale"], _DT_CODE[q.dtype], out=o,
                                      keep=(q, kc, vc, lens, bt))
        return super().prepare(family, **kw)

    def _gemm_runner(self, a, b):
        """pk.gemm's per-signature function on CPU: sizes and dtype code bound once, the output allocated by
        empty_like of a stride-0 [M, N] view of one element (a fresh contiguous tensor, ~0.4 us cheaper than
        new_empty((M, N)) on the 2-core Zen 4 VM)."""
        if a.is_cuda:
            return self.gemm
        (M, K), N = a.shape, b.shape[1]
        like = torch.empty((), dtype=a.dtype, device=a.device).expand(M, N)
        gemm, dt, empty_like = _ext().gemm, _DT_CODE[a.dtype], torch.empty_like

        def run(a, b):
            c = empty_like(like)
            gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), M, N, K, dt)
            return c

        return run

    def describe_call(self, family: str, inputs: dict) -> dict:
        """The CPU ISA tier (amx, avx512, avx2, neon, portable) that ran the call (PYKERNELS_CPU_ISA; an attention or
        decode call of a head dim the tier's kernels lack runs the portable code: the tiers' attention takes any D up to
        256, their decode 64 and 128), and for decode
        where its K/V prefetches go (l2, l1, l1-ungrouped, l1-grouped: PYKERNELS_CPU_PREFETCH), whether it
        prefetches each line a second time, nearer (PYKERNELS_CPU_PREFETCH_NEAR), how far ahead (bytes,
        PYKERNELS_CPU_PREFETCH_DISTANCE) and why (the default's reason, the override, or `pykernels tune`); for a
        GEMM of one row, the rows of B it reads per step (PYKERNELS_CPU_GEMV_STREAMS); for decode on a paged cache,
        the tokens of one kv head per step and why (PYKERNELS_CPU_PAGED_STEP; the AVX-512 tier's, see cpu.h)."""
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in inputs.values()):
            q = inputs.get("q")
            if family == "decode" and isinstance(q, torch.Tensor):
                d = {"cpu_isa": _ext().decode_cpu_isa(q.shape[-1])}  # portable code for a D other than 64 / 128
            elif family == "attention" and isinstance(q, torch.Tensor) and q.dtype in _DT_CODE:
                d = {"cpu_isa": _ext().attention_cpu_isa(q.shape[-1], _DT_CODE[q.dtype])}  # portable above 256
            else:
                d = {"cpu_isa": _ext().cpu_isa()}
            a = inputs.get("a")
            if family == "gemm" and isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == 1:
                d["cpu_gemv_streams"] = _ext().cpu_features()["gemv_streams"]  # rows of B per step (M = 1)
            if family == "decode":
                f = _ext().cpu_features()
                d["cpu_prefetch"] = f["stream_prefetch"]
                d["cpu_prefetch_near"] = bool(f.get("stream_prefetch_near"))
                d["cpu_prefetch_distance"] = f.get("stream_prefetch_distance")
                d["cpu_prefetch_source"] = f.get("stream_prefetch_source")
                if inputs.get("block_table") is not None:
                    d["cpu_paged_step"] = f.get("paged_step")
                    d["cpu_paged_step_source"] = f.get("paged_step_source")
            return d
        return {}

    def gemm(self, a, b):
        M, K = a.shape
        N = b.shape[1]
        c = a.new_empty((M, N))
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
        o = torch.empty_like(q)
        dev, stream = _dev(q)
        _ext().decode(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), o.data_ptr(), context_lens.data_ptr(),
                      *_decode_layout(q, k_cache, block_table), scale, _DT_CODE[q.dtype], dev, stream)
        return o


def _decode_layout(q, k_cache, block_table) -> tuple:
    """(block_table pointer or 0, B, Hq, Hkv, D, num_blocks, block_size, max_blocks) for the binding."""
    B, Hq, D = q.shape
    if block_table is None:
        return 0, B, Hq, k_cache.shape[1], D, B, k_cache.shape[2], 1
    return (block_table.data_ptr(), B, Hq, k_cache.shape[1], D, k_cache.shape[0], k_cache.shape[2],
            block_table.shape[1])
