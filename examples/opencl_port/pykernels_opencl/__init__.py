"""A pykernels backend plugin that is a real port: the three families as OpenCL C kernels (kernels.cl),
built at run time by the OpenCL driver found (PoCL on a CPU; any vendor's ICD elsewhere), with its own
device buffers. What a vendor copies: declare the backend, build its own kernels, move data into its
own memory once in `prepare`, and say when it is unavailable and why.

Data path: the inputs are torch tensors on the CPU. `prepare` copies them into OpenCL buffers and builds
the program (once per dtype and head dim; not timed). The timed callable enqueues the kernel, waits, and
reads the output back into a new torch tensor (a copy of the output only: M*N for gemm, the size of q for
attention and decode). The plain family methods do all of it on every call.

The OpenCL device: by default the first device of type CPU on any platform, so that results filed under
the torch device "cpu" were computed by this CPU. PYKERNELS_OPENCL_DEVICE="<platform>:<device>" (indices
as `clinfo -l` lists them) picks another one; the results are then still labelled "cpu" (the tensors'
device), so say which device ran them (describe_call records it in every result).
"""

from __future__ import annotations

import os
import threading
from importlib import resources

import torch

from pykernels.backends import Backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEFINE = {torch.float32: "-DDT_F32", torch.float16: "-DDT_F16", torch.bfloat16: "-DDT_BF16"}
_MAX_HD = 256  # the per-work-item arrays of attention and decode are HD floats; 256 keeps local memory <= 32 KB
# Work-group shapes, as kernels.cl defines them.
_GEMM_TILE, _GEMM_WG = 32, 8
_ATT_BQ = 32
_SMALL_M = 8  # gemm with M up to this runs gemm_small_m (SMALL_M in kernels.cl)


def _decode_wg(hd: int) -> int:
    return 16 if hd > 128 else 32


def _host(t: torch.Tensor):
    """A numpy view of a CPU tensor (bf16 as its raw 16 bits: numpy has no bfloat16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _find_device():
    """(device, None) or (None, reason)."""
    try:
        import pyopencl as cl
    except Exception as e:  # noqa: BLE001 - missing or broken pyopencl: unavailable, with the reason
        return None, f"pyopencl is not installed ({type(e).__name__}: {e}); pip install pyopencl"
    try:
        platforms = cl.get_platforms()
    except Exception as e:  # noqa: BLE001 - no ICD loader or no platform registered
        return None, (f"no OpenCL platform found ({type(e).__name__}: {e}); install a driver, e.g. "
                      "apt-get install pocl-opencl-icd")
    if not platforms:
        return None, "no OpenCL platform found; install a driver, e.g. apt-get install pocl-opencl-icd"
    choice = os.environ.get("PYKERNELS_OPENCL_DEVICE")
    if choice:
        try:
            p, d = (int(x) for x in choice.split(":"))
            return platforms[p].get_devices()[d], None
        except Exception as e:  # noqa: BLE001
            return None, f"PYKERNELS_OPENCL_DEVICE={choice!r} names no device ({type(e).__name__}: {e})"
    for p in platforms:
        try:
            devs = p.get_devices(device_type=cl.device_type.CPU)
        except Exception:  # noqa: BLE001 - a platform without CPU devices raises DEVICE_NOT_FOUND
            devs = []
        if devs:
            return devs[0], None
    names = ", ".join(f"{p.name}: {[d.name for d in p.get_devices()]}" for p in platforms)
    return None, f"no OpenCL CPU device (found {names}); set PYKERNELS_OPENCL_DEVICE=<platform>:<device>"


class OpenCLBackend(Backend):
    name = "opencl"
    tier = "abstraction"           # a portable kernel language compiled by whichever driver is found
    devices = ("cpu",)             # the torch device of the inputs; the OpenCL device is chosen above
    description = "example port: OpenCL C kernels built at run time by the OpenCL driver (examples/opencl_port)"
    dtypes = {("cpu", fam): _DTYPES for fam in ("gemm", "attention", "decode")}

    def __init__(self):
        self._lock = threading.Lock()
        self._state = None          # (context, queue, device) once opened
        self._programs: dict = {}   # (dtype, head dim) -> built program

    def availability(self):
        return _find_device()[1]

    def supports(self, family, device_type, dtype, **shape):
        reason = super().supports(family, device_type, dtype, **shape)
        if reason is None and family in ("attention", "decode") and shape.get("D", 0) > _MAX_HD:
            reason = f"backend 'opencl' supports head dims up to {_MAX_HD}, got D={shape['D']}"
        return reason

    # ---- OpenCL objects, created once ----------------------------------------------------------------
    def _open(self):
        import pyopencl as cl

        with self._lock:
            if self._state is None:
                dev, reason = _find_device()
                if dev is None:
                    raise RuntimeError(reason)
                ctx = cl.Context([dev])
                self._state = (ctx, cl.CommandQueue(ctx), dev)
            return self._state

    def _program(self, dtype, hd: int):
        import pyopencl as cl

        ctx, _, _ = self._open()
        key = (dtype, hd)
        with self._lock:
            if key not in self._programs:
                src = resources.files(__package__).joinpath("kernels.cl").read_text()
                self._programs[key] = cl.Program(ctx, src).build(options=[_DEFINE[dtype], f"-DHD={hd}"])
            return self._programs[key]

    def _buffer(self, t: torch.Tensor):
        import pyopencl as cl

        ctx, _, _ = self._open()
        return cl.Buffer(ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=_host(t))

    # ---- prepare: program built and inputs copied once; returns the timed callable --------------------
    def prepare(self, family: str, **kw):
        """Build (cached) and copy the inputs into OpenCL buffers; the callable runs the kernel on those
        copies, so input contents changed in place after this call are not seen (prepare again)."""
        import numpy as np
        import pyopencl as cl

        ctx, queue, _ = self._open()
        if family == "gemm":
            a, b = kw["a"], kw["b"]
            M, K = a.shape
            N = b.shape[1]
            prog, shape, dtype = self._program(a.dtype, 64), (M, N), a.dtype  # any HD: gemm does not use it
            args = [self._buffer(a), self._buffer(b), None, np.int32(M), np.int32(N), np.int32(K)]
            out_at = 2
            if M <= _SMALL_M:
                kern, gsize, lsize = cl.Kernel(prog, "gemm_small_m"), ((N + 63) // 64 * 64,), (64,)
            else:
                t = _GEMM_TILE
                kern = cl.Kernel(prog, "gemm")
                gsize = ((N + t - 1) // t * _GEMM_WG, (M + t - 1) // t * _GEMM_WG)
                lsize = (_GEMM_WG, _GEMM_WG)
        elif family == "attention":
            q, k, v = kw["q"], kw["k"], kw["v"]
            B, Hq, S, D = q.shape
            prog, shape, dtype = self._program(q.dtype, D), tuple(q.shape), q.dtype
            args = [self._buffer(q), self._buffer(k), self._buffer(v), None, np.int32(Hq), np.int32(k.shape[1]),
                    np.int32(S), np.float32(kw["scale"]), np.int32(bool(kw["causal"]))]
            kern, out_at = cl.Kernel(prog, "attention"), 3
            gsize, lsize = ((S + _ATT_BQ - 1) // _ATT_BQ * _ATT_BQ, B * Hq), (_ATT_BQ, 1)
        elif family == "decode":
            q, kc, vc, lens, bt = kw["q"], kw["k_cache"], kw["v_cache"], kw["context_lens"], kw.get("block_table")
            B, Hq, D = q.shape
            prog, shape, dtype = self._program(q.dtype, D), tuple(q.shape), q.dtype
            paged = bt is not None
            table = bt if paged else torch.zeros(1, dtype=torch.int32)
            args = [self._buffer(q), self._buffer(kc), self._buffer(vc), self._buffer(lens), self._buffer(table),
                    None, np.int32(paged), np.int32(bt.shape[1] if paged else 1), np.int32(Hq),
                    np.int32(kc.shape[1]), np.int32(kc.shape[2]), np.float32(kw["scale"])]
            kern, out_at = cl.Kernel(prog, "decode"), 5
            wg = _decode_wg(D)
            gsize, lsize = (B * Hq * wg,), (wg,)
        else:
            raise ValueError(f"argument 'family' must be one of gemm, attention, decode, got {family!r}")
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        args[out_at] = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, size=nbytes)
        kern.set_args(*args)

        def run() -> torch.Tensor:  # `args` is read here so that the buffers live as long as the callable
            out = torch.empty(shape, dtype=dtype)
            cl.enqueue_nd_range_kernel(queue, kern, gsize, lsize)
            cl.enqueue_copy(queue, _host(out), args[out_at], is_blocking=True)
            return out

        return run

    # ---- the plain family methods: everything on every call ----------------------------------------
    def gemm(self, a, b):
        return self.prepare("gemm", a=a, b=b)()

    def attention(self, q, k, v, *, causal, scale):
        return self.prepare("attention", q=q, k=k, v=v, causal=causal, scale=scale)()

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self.prepare("decode", q=q, k_cache=k_cache, v_cache=v_cache, context_lens=context_lens,
                            block_table=block_table, scale=scale)()

    def describe_call(self, family, inputs):
        _, _, dev = self._open()
        return {"opencl_device": dev.name.strip(), "opencl_platform": dev.platform.name.strip(),
                "opencl_version": dev.version.strip(), "driver": dev.driver_version.strip(),
                "timed": "kernel + wait + copy of the output into a new torch tensor"}
