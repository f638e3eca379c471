"""Backends: the registry and one module per built-in backend (native, torch, torch_compile, numpy,
triton). Backend modules are imported lazily by the registry so that a missing optional dependency
only makes its own backend unavailable."""

from .registry import (
    TIERS,
    Backend,
    BackendInfo,
    BackendUnavailableError,
    UnsupportedError,
    all_backends,
    backends,
    get,
    register,
    unregister,
)

__all__ = [
    "TIERS", "Backend", "BackendInfo", "BackendUnavailableError", "UnsupportedError", "all_backends",
    "backends", "get", "register", "unregister",
]
