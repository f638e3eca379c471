"""Shared test helpers: devices, backends under test, and the check of one backend on one problem."""

from __future__ import annotations

import pytest
import torch

import pykernels as pk
from pykernels.backends import registry
from pykernels.harness import verify

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="no CUDA device on this machine")]),
]

# Backends checked by the family tests here. triton / triton_interpret have their own test file
# (tests/test_triton.py); torch_compile compiles per shape (seconds each) so it gets a few cases only.
CORE_BACKENDS = ["native", "torch", "torch_ops", "numpy"]


def run_checked(problem, dtype: torch.dtype, backend: str, device: str, seed: int = 0) -> float:
    """Run `backend` on `problem` and assert it is within tolerance of the float64 reference.

    Skips (with the backend's reason) when the backend is unavailable or does not support the case."""
    b = registry.all_backends().get(backend)
    if b is None:
        pytest.skip(f"backend {backend!r} is not registered")
    reason = registry.info(b).reason
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    shape = problem.params()
    reason = b.supports(problem.family, device, dtype, **shape)
    if reason is not None:
        pytest.skip(reason)
    inputs = problem.make_inputs(dtype, device=device, seed=seed)
    exp = verify.expected(problem, inputs)
    fn = getattr(pk, problem.family)
    out = fn(**inputs, **problem.call_kwargs(), backend=backend)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert out.device.type == device
    return exp.assert_close(out, what=f"{backend} {problem.label()} {dtype}")


# hypothesis profiles of the fuzz tests (tests/test_fuzz.py): a bounded budget by default, a long run on demand
# (PYKERNELS_FUZZ=long, or pytest --hypothesis-profile pykernels-long).
def _fuzz_profiles():
    import os

    from hypothesis import settings

    settings.register_profile("pykernels-ci", max_examples=15, deadline=None, derandomize=True)
    settings.register_profile("pykernels-long", max_examples=2000, deadline=None)
    settings.load_profile("pykernels-long" if os.environ.get("PYKERNELS_FUZZ") == "long" else "pykernels-ci")


_fuzz_profiles()
