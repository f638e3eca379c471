"""The registry: declarations, availability with reasons, no silent fallback, plugins that fail."""

import pytest
import torch

import pykernels as pk
from pykernels.backends import Backend, registry


def test_backends_lists_builtins_with_tiers():
    infos = {b.name: b for b in pk.backends()}
    assert {"native", "torch", "torch_compile", "numpy", "triton", "triton_interpret"} <= set(infos)
    assert infos["native"].tier == "native"
    assert infos["torch"].tier == "vendor" and infos["numpy"].tier == "vendor"
    assert infos["torch_compile"].tier == "abstraction" and infos["triton"].tier == "abstraction"
    for b in infos.values():
        assert b.available == (b.reason is None)
        assert b.available or b.reason  # never unavailable without a reason


def test_cpu_backends_available_here():
    infos = {b.name: b for b in pk.backends()}
    for name in ("native", "torch", "numpy"):
        assert infos[name].available, infos[name].reason


def test_unavailable_backend_raises_with_reason_and_names():
    class Missing(Backend):
        name = "missing_lib"
        tier = "vendor"
        devices = ("cpu",)
        dtypes = {("cpu", "gemm"): (torch.float32,)}

        def availability(self):
            return "libfoo is not installed"

    registry.register(Missing())
    try:
        with pytest.raises(pk.BackendUnavailableError, match="libfoo is not installed.*native"):
            pk.gemm(torch.randn(2, 2), torch.randn(2, 2), backend="missing_lib")
        info = {b.name: b for b in pk.backends()}["missing_lib"]
        assert not info.available and info.reason == "libfoo is not installed"
    finally:
        registry.unregister("missing_lib")


def test_register_rejects_nonsense():
    class Bad(Backend):
        name = "bad name"
        tier = "vendor"
        devices = ("cpu",)

    with pytest.raises(ValueError, match="invalid backend name"):
        registry.register(Bad())

    class BadTier(Backend):
        name = "bad_tier"
        tier = "fast"
        devices = ("cpu",)

    with pytest.raises(ValueError, match="invalid tier"):
        registry.register(BadTier())


def test_broken_plugin_is_unavailable_not_fatal(monkeypatch):
    """An entry point that fails to import becomes one unavailable backend with the error as reason."""
    registry._add_loaded("broken_plugin", "no_such_module_xyz:Thing", "plugin:test")
    try:
        info = {b.name: b for b in pk.backends()}["broken_plugin"]
        assert not info.available and "no_such_module_xyz" in info.reason
        with pytest.raises(pk.BackendUnavailableError, match="no_such_module_xyz"):
            registry.get("broken_plugin")
        # The others still work.
        pk.gemm(torch.randn(3, 3), torch.randn(3, 3), backend="torch")
    finally:
        registry.unregister("broken_plugin")


def test_plugin_declaring_a_different_name_is_rejected():
    registry._add_loaded("alias", "pykernels.backends.torch_ops:TorchBackend", "plugin:test")
    try:
        info = {b.name: b for b in pk.backends()}["alias"]
        assert not info.available and "declares a backend named 'torch'" in info.reason
    finally:
        registry.unregister("alias")


def test_native_on_cuda_says_why_when_no_gpu():
    b = registry.get("native")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    # The declaration covers cuda; on this machine tensors cannot be put there, so supports() is the check.
    from pykernels import _C

    reason = b.supports("gemm", "cuda", torch.bfloat16)
    assert reason is None if _C.has_cuda else "built without CUDA" in reason
