"""Backend registry: built-in backends plus plugins from the `pykernels.backends` entry-point group.

A backend declares a name, a tier, its devices, the dtypes it supports per (device, family), and an
availability check that gives a reason. Asked for by name and missing or unavailable: raise, with the
reason and the names that are available. Never a silent fallback (STYLE.md 5).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch

TIERS = ("native", "vendor", "abstraction")
FAMILY_NAMES = ("gemm", "attention", "decode")
ENTRY_POINT_GROUP = "pykernels.backends"


class BackendUnavailableError(RuntimeError):
    """A backend that exists but cannot run here (missing dependency, no device, failed plugin)."""


class UnsupportedError(TypeError):
    """A backend that runs here but does not support this family, dtype, device or shape."""


class Backend:
    """Base class. Subclasses set the class attributes and implement the families they support.

    The family methods receive inputs that pykernels.ops has already validated (contiguous, same device,
    consistent shapes, `scale` resolved to a float) and return a new output tensor. They never time
    themselves.
    """

    name: str = ""
    tier: str = ""
    devices: tuple[str, ...] = ()
    description: str = ""
    # {(device_type, family): (dtype, ...)}; a missing key means "not supported".
    dtypes: dict[tuple[str, str], tuple[torch.dtype, ...]] = {}

    def availability(self) -> str | None:
        """None when usable here, else the reason it is not."""
        return None

    def supports(self, family: str, device_type: str, dtype: torch.dtype, **shape) -> str | None:
        """None when this (family, device, dtype, shape) is supported, else the reason it is not.
        Subclasses extend this with shape limits (e.g. head dims)."""
        if device_type not in self.devices:
            return f"backend {self.name!r} does not run on {device_type} (it runs on: {', '.join(self.devices)})"
        supported = self.dtypes.get((device_type, family))
        if not supported:
            fams = sorted({f for (d, f) in self.dtypes if d == device_type})
            return (f"backend {self.name!r} does not implement {family!r} on {device_type} "
                    f"(it implements: {', '.join(fams) or 'nothing'})")
        if dtype not in supported:
            names = ", ".join(str(d).replace("torch.", "") for d in supported)
            return (f"backend {self.name!r} does not support dtype {str(dtype).replace('torch.', '')} for "
                    f"{family!r} on {device_type} (supported: {names})")
        if family == "gemm" and shape.get("layout", "nn") != "nn" and type(self).linear is Backend.linear:
            return (f"backend {self.name!r} does not implement linear (gemm with b stored [N, K], layout "
                    f"{shape.get('layout')!r})")
        return None

    def families(self) -> tuple[str, ...]:
        return tuple(f for f in FAMILY_NAMES if any(k[1] == f for k in self.dtypes))

    # Family entry points -------------------------------------------------------------------------
    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [M, K] . w[N, K]^T -> [M, N] (pk.linear; the gemm family's layout "nt"). Optional: a backend
        that does not override it is reported as not supporting that layout, never run through a copy."""
        raise NotImplementedError

    def attention(self, q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale: float) -> torch.Tensor:
        raise NotImplementedError

    # The callable the harness times. ---------------------------------------------------------------
    def prepare(self, family: str, **kw) -> Callable[[], torch.Tensor]:
        """Turn validated inputs into the zero-argument callable that is timed (pk.prepare calls this).

        `kw` are the family method's arguments, already validated by pykernels.ops: gemm `a, b` (and
        `layout="nt"` when b is stored [N, K]: the `linear` method's call); attention
        `q, k, v, causal, scale`; decode `q, k_cache, v_cache, context_lens, block_table, scale`. Override it to
        do one-off work outside the timed call (device buffers, layouts, compiled executables, a preallocated
        output); its cost is measured and recorded beside the result as `prepare_s`. The callable returns the
        output (it may return the same tensor on every call) and must compute from the tensors passed here,
        so that changing their contents in place changes the result. Default: the family method, as is.
        """
        if family == "gemm":  # layout "nt" (b stored [N, K]): the linear method
            fn, a, b = (self.linear if kw.get("layout", "nn") == "nt" else self.gemm), kw["a"], kw["b"]
            return lambda: fn(a, b)
        if family == "attention":
            fn, q, k, v, causal, scale = self.attention, kw["q"], kw["k"], kw["v"], kw["causal"], kw["scale"]
            return lambda: fn(q, k, v, causal=causal, scale=scale)
        if family == "decode":
            fn, scale = self.decode, kw["scale"]
            args = (kw["q"], kw["k_cache"], kw["v_cache"], kw["context_lens"], kw["block_table"])
            return lambda: fn(*args, scale=scale)
        raise ValueError(f"argument 'family' must be one of {', '.join(FAMILY_NAMES)}, got {family!r}")

    def _gemm_runner(self, a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Private: the function pk.gemm calls for every later call with the signature of (a, b) (same shapes,
        strides, dtypes, devices), which pykernels.ops caches once validated. Default: the family method."""
        return self.gemm

    # Optional: per-call details worth recording (e.g. the autotuned configuration). ---------------
    def describe_call(self, family: str, inputs: dict) -> dict:
        return {}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    tier: str
    devices: tuple[str, ...]
    available: bool
    reason: str | None = None
    families: tuple[str, ...] = ()
    source: str = "builtin"
    description: str = ""


class _Broken(Backend):
    """Stands in for a plugin that failed to load or declared nonsense: unavailable, with the error."""

    tier = "abstraction"

    def __init__(self, name: str, error: str):
        self.name = name
        self.devices = ()
        self.dtypes = {}
        self._error = error

    def availability(self) -> str | None:
        return self._error


_BUILTIN = (
    ("native", "pykernels.backends.native:NativeBackend"),
    ("torch", "pykernels.backends.torch_ops:TorchBackend"),
    ("torch_ops", "pykernels.backends.torch_ops:TorchOpsBackend"),
    ("torch_compile", "pykernels.backends.torch_compile:TorchCompileBackend"),
    ("numpy", "pykernels.backends.numpy_ops:NumpyBackend"),
    ("triton", "pykernels.backends.triton:TritonBackend"),
    ("triton_interpret", "pykernels.backends.triton:TritonInterpretBackend"),
    ("jax", "pykernels.backends.jax_backend:JaxBackend"),
)

_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_sources: dict[str, str] = {}
_loaded = False
# Bumped whenever the set of backends changes; pykernels.ops drops its cache of validated call signatures
# (which remembers the backend each one resolved to) when it moves.
generation = 0


def _changed() -> None:
    global generation
    generation += 1


def _load_object(spec: str):
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _instantiate(obj) -> Backend:
    inst = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend)) else obj
    if not isinstance(inst, Backend):
        raise TypeError(f"entry point gave {type(inst).__name__}, not a pykernels.backends.Backend")
    return inst


def _check_declaration(b: Backend) -> str | None:
    if not isinstance(b.name, str) or not b.name.isidentifier():
        return f"invalid backend name {b.name!r} (must be an identifier)"
    if b.tier not in TIERS:
        return f"invalid tier {b.tier!r} (must be one of {', '.join(TIERS)})"
    if not isinstance(b.devices, tuple) or not b.devices or not all(isinstance(d, str) for d in b.devices):
        return "devices must be a non-empty tuple of device type names"
    if not isinstance(b.dtypes, dict):
        return "dtypes must be a dict {(device, family): (torch.dtype, ...)}"
    for key, dts in b.dtypes.items():
        if (not isinstance(key, tuple) or len(key) != 2 or key[1] not in FAMILY_NAMES
                or not all(isinstance(d, torch.dtype) for d in dts)):
            return f"invalid dtypes entry {key!r}: {dts!r}"
    return None


def register(backend: Backend, *, source: str = "builtin", replace: bool = False) -> None:
    """Add a backend instance. A declaration that does not make sense raises ValueError."""
    problem = _check_declaration(backend)
    if problem:
        raise ValueError(f"cannot register backend {getattr(backend, 'name', '?')!r}: {problem}")
    with _lock:
        _ensure_loaded()
        if backend.name in _backends and not replace:
            raise ValueError(f"a backend named {backend.name!r} is already registered")
        _backends[backend.name] = backend
        _sources[backend.name] = source
        _changed()


def unregister(name: str) -> None:
    with _lock:
        _backends.pop(name, None)
        _sources.pop(name, None)
        _changed()


def _add_loaded(name: str, spec: str, source: str) -> None:
    try:
        inst = _instantiate(_load_object(spec))
        problem = _check_declaration(inst)
        if problem is None and inst.name != name:
            problem = f"entry point {name!r} declares a backend named {inst.name!r}"
        if problem:
            inst = _Broken(name, f"plugin declaration is invalid: {problem}")
    except Exception as e:  # noqa: BLE001 - a broken plugin never breaks import pykernels or the other backends
        inst = _Broken(name, f"failed to load {spec}: {type(e).__name__}: {e}")
    if name in _backends:  # built-ins win over a plugin of the same name
        return
    _backends[name] = inst
    _sources[name] = source
    _changed()


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        _loaded = True
        for name, spec in _BUILTIN:
            _add_loaded(name, spec, "builtin")
        try:
            eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception:  # noqa: BLE001 - broken metadata of another package
            eps = ()
        for ep in eps:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
            _add_loaded(ep.name, ep.value, f"plugin:{dist}")


def all_backends() -> dict[str, Backend]:
    _ensure_loaded()
    with _lock:
        return dict(_backends)


def info(b: Backend) -> BackendInfo:
    try:
        reason = b.availability()
    except Exception as e:  # noqa: BLE001 - a plugin's availability check may raise anything
        reason = f"availability check failed: {type(e).__name__}: {e}"
    return BackendInfo(name=b.name, tier=b.tier, devices=tuple(b.devices), available=reason is None,
                       reason=reason, families=b.families() if reason is None or b.dtypes else (),
                       source=_sources.get(b.name, "builtin"), description=b.description)


def backends() -> list[BackendInfo]:
    """Every known backend with whether it is available here and, if not, why."""
    return [info(b) for b in all_backends().values()]


def get(name: str) -> Backend:
    """The backend called `name`, ready to run; raises with the reason and the available names."""
    if not isinstance(name, str):
        raise TypeError(f"argument 'backend' must be a str, got {type(name).__name__}")
    bs = all_backends()
    if name not in bs:
        raise ValueError(f"argument 'backend': unknown backend {name!r}; known backends: {', '.join(sorted(bs))}")
    b = bs[name]
    reason = info(b).reason
    if reason is not None:
        avail = sorted(n for n, x in bs.items() if info(x).available)
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {reason}. Available backends: {', '.join(avail) or 'none'}")
    return b
