"""`jax`: the three families written in JAX and compiled by XLA (`jax.jit`), one executable per shape.

Inputs cross from torch by DLPack without a copy (checked: the JAX buffer is the torch buffer) and the
output goes back the same way. `prepare()` converts the inputs and compiles once (a first call), so the
timed callable is only: the jitted call, `block_until_ready()`, and `torch.from_dlpack` of the result —
a zero-copy wrap of a few microseconds that cannot be moved out, since the harness checks a torch tensor.
The plain family methods (used before `prepare` is called by pykernels.ops) convert on every call.

- gemm: `lax.dot_general` with `preferred_element_type=float32`, cast to the input dtype.
- attention: `jax.nn.dot_product_attention`, implementation "xla"; on CUDA in fp16/bf16 the cuDNN
  implementation is tried first. XLA:CPU rejects JAX's f16 x f16 -> f32 dot (every shape) and the bf16 one
  (some tiny shapes): those cases run on float32 copies of the inputs inside the jitted function. The one
  used, and why the others were not, is recorded by `describe_call` (`attention_impl`).
- decode: a gather of the cache through the block table (paged) or the contiguous cache, a length mask,
  softmax in float32, grouped-query heads by reshape (no repeat of K/V).

fp32 products use `Precision.HIGHEST` (no TF32 or bf16 passes on GPUs; on CPU it is the default anyway).
"""

from __future__ import annotations

import threading

import torch

from .registry import Backend

_ALL = (torch.float32, torch.float16, torch.bfloat16)


def _jax():
    import jax

    return jax


def _precision(dtype):
    import jax.numpy as jnp
    from jax import lax

    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _gemm_fn(a, b):
    import jax.numpy as jnp
    from jax import lax

    c = lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                        preferred_element_type=jnp.float32)
    return c.astype(a.dtype)


def _attention_fn(q, k, v, *, causal, scale, implementation, upcast=False):
    jax = _jax()
    import jax.numpy as jnp

    dtype = q.dtype
    if upcast:  # float16 on XLA:CPU, which rejects the f16 x f16 -> f32 dot that JAX asks for
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    # pykernels is [B, H, S, D]; JAX takes [B, S, H, D]. XLA folds the transposes into the dots.
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    prec = "highest" if q.dtype == jnp.float32 else "default"
    with jax.default_matmul_precision(prec):  # read while tracing: the fp32 products stay fp32
        o = jax.nn.dot_product_attention(qt, kt, vt, scale=scale, is_causal=causal, implementation=implementation)
    return jnp.swapaxes(o, 1, 2).astype(dtype)


def _decode_fn(q, k_cache, v_cache, context_lens, block_table, *, scale):
    import jax.numpy as jnp

    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if block_table is None:
        k, v = k_cache, v_cache  # [B, Hkv, Lmax, D]
    else:
        nb, _, bs, _ = k_cache.shape
        mb = block_table.shape[1]
        # Entries past a sequence's used blocks may hold anything: clamp them to a real block, the length
        # mask below removes what they contribute.
        idx = jnp.clip(block_table, 0, nb - 1)
        k = k_cache[idx].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, mb * bs, D)
        v = v_cache[idx].transpose(0, 2, 1, 3, 4).reshape(B, Hkv, mb * bs, D)
    L = k.shape[2]
    valid = jnp.arange(L, dtype=jnp.int32)[None, :] < context_lens[:, None]  # [B, L]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    prec = _precision(q.dtype)
    s = jnp.einsum("bhgd,bhld->bhgl", qg, k, precision=prec, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    # Rows past the length may hold NaN/Inf (unused cache): 0 * NaN would leak, so they are zeroed.
    v = jnp.where(valid[:, None, :, None], v, jnp.zeros((), v.dtype))
    o = jnp.einsum("bhgl,bhld->bhgd", p, v.astype(jnp.float32), precision=prec,
                   preferred_element_type=jnp.float32)
    return o.reshape(B, Hq, D).astype(q.dtype)


def _to_jax(t: torch.Tensor):
    jax = _jax()

    return jax.dlpack.from_dlpack(t)


def _to_torch(x) -> torch.Tensor:
    return torch.from_dlpack(x)


class JaxBackend(Backend):
    name = "jax"
    tier = "abstraction"
    devices = ("cpu", "cuda")
    description = "JAX, compiled by XLA (jax.jit, one executable per shape); inputs and output by DLPack"
    dtypes = {(d, f): _ALL for d in ("cpu", "cuda") for f in ("gemm", "attention", "decode")}

    def __init__(self):
        self._lock = threading.Lock()
        self._jitted: dict = {}
        self._attn_impl: dict = {}  # (device, dtype, shapes, causal) -> "xla" | "cudnn" | "xla (cudnn: why not)"

    def availability(self) -> str | None:
        try:
            import jax
            import jax.numpy  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a broken install is as unavailable as a missing one
            return f"jax is not installed ({type(e).__name__}: {e}); pip install -e \".[jax]\""
        return None

    def supports(self, family, device_type, dtype, **shape):
        reason = super().supports(family, device_type, dtype, **shape)
        if reason is None and device_type == "cuda":
            try:
                _jax().devices("gpu")
            except RuntimeError as e:
                return f"this JAX has no CUDA backend (a CPU build?): {e}"
        return reason

    def _jit(self, key, fn, **static):
        jax = _jax()
        with self._lock:
            if key not in self._jitted:
                import functools

                self._jitted[key] = jax.jit(functools.partial(fn, **static))
            return self._jitted[key]

    # ---- prepare: inputs converted once, executable compiled once; returns the timed callable ----------
    def _build(self, family: str, kw: dict):
        """(jitted function, its JAX arguments) for validated torch inputs."""
        if family == "gemm":
            args = (_to_jax(kw["a"]), _to_jax(kw["b"]))
            return self._jit(("gemm",), _gemm_fn), args
        if family == "attention":
            args = tuple(_to_jax(kw[n]) for n in ("q", "k", "v"))
            return self._attention_executable(kw["q"], args, bool(kw["causal"]), float(kw["scale"])), args
        if family == "decode":
            bt = kw.get("block_table")
            args = tuple(_to_jax(kw[n]) for n in ("q", "k_cache", "v_cache", "context_lens"))
            args += (None if bt is None else _to_jax(bt),)
            return self._jit(("decode", float(kw["scale"])), _decode_fn, scale=float(kw["scale"])), args
        raise ValueError(f"argument 'family' must be one of gemm, attention, decode, got {family!r}")

    def prepare(self, family: str, **kw):
        f, args = self._build(family, kw)
        f(*args).block_until_ready()  # compile (and run once) here, never in the timed call

        def run() -> torch.Tensor:
            return _to_torch(f(*args).block_until_ready())

        return run

    def _attention_executable(self, q_t, args, causal, scale):
        """The first implementation that compiles and runs for this case, tried in order: cuDNN (CUDA,
        fp16/bf16), XLA, XLA on float32 copies of fp16/bf16 inputs (XLA:CPU rejects the f16 x f16 -> f32
        dot for every shape and the bf16 one for some). Which one ran, and why the others did not, is
        recorded and reported by describe_call (`attention_impl`)."""
        key = (str(q_t.device), str(q_t.dtype), tuple(q_t.shape), tuple(args[1].shape), causal)
        half = q_t.dtype in (torch.float16, torch.bfloat16)
        tries = ([("cudnn", False)] if q_t.device.type == "cuda" and half else []) + [("xla", False)]
        if half:
            tries.append(("xla", True))
        why_not = []
        for impl, upcast in tries:
            f = self._jit(("attention", causal, scale, impl, upcast), _attention_fn, causal=causal, scale=scale,
                          implementation=impl, upcast=upcast)
            if len(tries) > 1:
                try:
                    f(*args).block_until_ready()
                except Exception as e:
                    if (impl, upcast) == tries[-1]:
                        raise
                    msg = (str(e).splitlines() or [""])[0][:160]
                    why_not.append(f"{impl}{' on float32 copies' if upcast else ''} not used: {msg}")
                    continue
            name = impl + (" on float32 copies of the inputs" if upcast else "")
            self._attn_impl[key] = name + (f" ({'; '.join(why_not)})" if why_not else "")
            return f
        raise AssertionError("unreachable")

    # ---- the plain family methods: convert, run (compiled on the first call of a shape), convert back --
    def _call(self, family: str, **kw) -> torch.Tensor:
        f, args = self._build(family, kw)
        return _to_torch(f(*args).block_until_ready())

    def gemm(self, a, b):
        return self._call("gemm", a=a, b=b)

    def attention(self, q, k, v, *, causal, scale):
        return self._call("attention", q=q, k=k, v=v, causal=causal, scale=scale)

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return self._call("decode", q=q, k_cache=k_cache, v_cache=v_cache, context_lens=context_lens,
                          block_table=block_table, scale=scale)

    def describe_call(self, family: str, inputs: dict) -> dict:
        jax = _jax()
        t = inputs.get("a") if family == "gemm" else inputs.get("q")
        d = {"jax": jax.__version__, "xla_platform": jax.default_backend(),
             "timed": "jitted call + block_until_ready + torch.from_dlpack (zero-copy)"}
        if family == "attention" and t is not None:
            key = (str(t.device), str(t.dtype), tuple(t.shape), tuple(inputs["k"].shape), bool(inputs.get("causal")))
            d["attention_impl"] = self._attn_impl.get(key, "cudnn or xla" if t.device.type == "cuda" else "xla")
        if t is not None:
            try:
                d["dlpack_zero_copy"] = _to_jax(t).unsafe_buffer_pointer() == t.data_ptr()
            except Exception as e:  # noqa: BLE001 - informational only
                d["dlpack_zero_copy"] = f"unknown ({type(e).__name__}: {e})"
        return d
