"""`triton` and `triton_interpret`: pykernels' own Triton kernels (pykernels/triton/).

`triton` compiles them for CUDA tensors. `triton_interpret` runs the same kernel source in Triton's
interpreter on CPU tensors: it checks the kernels' logic on machines without a GPU and is never timed
(the harness leaves it out of timing and penalties). The interpreter mode is confined to that backend's
own instance of the kernel modules; see pykernels/triton/__init__.py for how.

triton is imported lazily: without it both backends are unavailable, with the reason.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .registry import Backend

_ALL = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
_INT32_MAX = 2**31 - 1


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
        return f"triton is not importable ({type(e).__name__}: {e}); install it with `pip install triton`"
    return None


@functools.lru_cache(maxsize=1)
def _interpreter_probe() -> str | None:
    """Triton 3.6's interpreter turns scalar kernel arguments into 1-element arrays and converts them with
    int() (for loop bounds); recent NumPy (2.4.6 here) refuses that. Triton 3.9 squeezes the array first.
    Only when this NumPy refuses it, run a 1x1x1 interpreted GEMM to see whether this Triton is affected."""
    import numpy as np

    try:
        with warnings.catch_warnings():  # NumPy 1.25 .. 2.3 only warn (DeprecationWarning): that still works
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.ones(1, dtype=np.int32))
        return None
    except TypeError:
        pass
    import triton

    from ..triton import INTERPRETER_LOCK, load

    x = torch.ones(1, 1)
    try:
        with INTERPRETER_LOCK:
            load("gemm", interpret=True).gemm(x, x)
    except Exception as e:  # noqa: BLE001 - any failure of the probe makes the backend unavailable, with it
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {np.__version__} "
                f"({type(e).__name__}: {str(e)[:200]}); Triton 3.9 works with it, and so does this Triton "
                "with an older NumPy (2.2.6 does)")
    return None


class _TritonBase(Backend):
    tier = "abstraction"
    interpret = False

    def __init__(self):
        self._mods: dict[str, object] = {}

    def _mod(self, family: str):
        mod = self._mods.get(family)
        if mod is None:
            from ..triton import load

            mod = self._mods[family] = load(family, interpret=self.interpret)
        return mod

    def supports(self, family, device_type, dtype, **shape):
        reason = super().supports(family, device_type, dtype, **shape)
        if reason:
            return reason
        d = shape.get("D")
        if family in ("attention", "decode") and d is not None and d not in HEAD_DIMS:
            return f"backend {self.name!r} supports head dims {HEAD_DIMS} for {family}, got D={d}"
        if family == "gemm":
            M, N, K = (shape.get(x) for x in ("M", "N", "K"))
            if None not in (M, N, K) and max(M * K, K * N, M * N) > _INT32_MAX:
                # Tile offsets are int32 (what keeps the address arithmetic cheap); 46341^2 is the limit.
                return f"backend {self.name!r} supports gemm operands of at most 2**31 - 1 elements"
        return None

    def gemm(self, a, b):
        return self._mod("gemm").gemm(a, b)

    def linear(self, x, w):
        return self._mod("gemm").gemm(x, w, trans_b=True)

    def attention(self, q, k, v, *, causal, scale):
        return self._mod("attention").attention(q, k, v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self._mod("decode").decode(q, k_cache, v_cache, context_lens, block_table, scale=scale)

    def describe_call(self, family: str, inputs: dict) -> dict:
        """The configuration a call used: the autotuned one (gemm, attention; None before the first call of
        that shape) or the decode plan (tile, chunk length, number of chunks)."""
        import triton

        info: dict = {"triton_version": triton.__version__, "interpreted": self.interpret}
        try:
            if family == "gemm":
                a, b = inputs["a"], inputs["b"]
                nt = inputs.get("layout", "nn") == "nt"
                info["config"] = self._mod("gemm").chosen_config(a.shape[0], b.shape[0] if nt else b.shape[1],
                                                                 a.shape[1], a.dtype, nt)
            elif family == "attention":
                q, k = inputs["q"], inputs["k"]
                B, Hq, S, D = q.shape
                causal = bool(inputs.get("causal", False))
                chosen = self._mod("attention").chosen_config
                info["config"] = chosen(B, Hq, k.shape[1], S, D, causal, q.dtype)
            elif family == "decode":
                q, kc, bt = inputs["q"], inputs["k_cache"], inputs.get("block_table")
                rows = kc.shape[2]
                capacity = bt.shape[1] * rows if bt is not None else rows
                plan = self._mod("decode").plan(q.shape[0], kc.shape[1], capacity, q.shape[2], q.device)
                info["config"] = ", ".join(f"{k}={v}" for k, v in plan.items())
        except (KeyError, AttributeError, IndexError) as e:  # inputs not shaped like a call of `family`
            info["config_error"] = f"{type(e).__name__}: {e}"
        return info


class TritonBackend(_TritonBase):
    name = "triton"
    devices = ("cuda",)
    description = ("pykernels' Triton kernels compiled for the GPU: tl.dot GEMM (autotuned, grouped order), "
                   "flash attention, split-KV decode (contiguous and paged)")
    dtypes = {("cuda", f): _ALL for f in ("gemm", "attention", "decode")}

    def availability(self) -> str | None:
        reason = _triton_reason()
        if reason:
            return reason
        import triton.language as tl

        if type(tl.standard.max).__name__ == "InterpretedFunction":
            return ("Triton was imported with TRITON_INTERPRET=1, so its own library functions run only in "
                    "the interpreter in this process; unset TRITON_INTERPRET (the 'triton_interpret' "
                    "backend sets it for its own kernels)")
        if not torch.cuda.is_available():
            return ("no CUDA device (the Triton kernels compile only for GPUs; on CPU, 'triton_interpret' "
                    "checks their correctness)")
        return None


class TritonInterpretBackend(_TritonBase):
    name = "triton_interpret"
    devices = ("cpu",)
    interpret = True
    description = ("the same Triton kernels run by Triton's interpreter (TRITON_INTERPRET) on CPU tensors: "
                   "correctness only, never timed or used in penalties")
    dtypes = {("cpu", f): _ALL for f in ("gemm", "attention", "decode")}

    def availability(self) -> str | None:
        reason = _triton_reason()
        if reason:
            return reason
        try:
            import numpy  # noqa: F401 - the interpreter computes with numpy
        except ImportError as e:
            return f"Triton's interpreter needs numpy ({e})"
        return _interpreter_probe()

    def _locked(self, fn, *args, **kwargs):
        from ..triton import INTERPRETER_LOCK

        # The interpreter patches triton.language for the duration of a launch: one launch at a time.
        with INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    def gemm(self, a, b):
        return self._locked(super().gemm, a, b)

    def linear(self, x, w):
        return self._locked(super().linear, x, w)

    def attention(self, q, k, v, *, causal, scale):
        return self._locked(super().attention, q, k, v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self._locked(super().decode, q, k_cache, v_cache, context_lens, block_table, scale=scale)
