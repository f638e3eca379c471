"""Shared test helpers: devices, backends under test, and the check of one backend on one problem."""

from __future__ import annotations

import os

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
    # The output tends to reuse the block just freed by torch's baseline, which holds a right answer: fill
    # that block with NaN first, so an element the kernel never writes fails the check instead of passing.
    torch.full(exp.reference.shape, float("nan"), dtype=dtype, device=device)
    fn = getattr(pk, problem.family)
    out = fn(**inputs, **problem.call_kwargs(), backend=backend)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert out.device.type == device
    return exp.assert_close(out, what=f"{backend} {problem.label()} {dtype}")


# hypothesis profiles of the fuzz tests (tests/test_fuzz.py): a bounded budget by default, a long run on demand
# (PYKERNELS_FUZZ=long or PYKERNELS_FUZZ=<examples per test>, or pytest --hypothesis-profile pykernels-long).
def _fuzz_profiles():
    import os

    from hypothesis import settings

    settings.register_profile("pykernels-ci", max_examples=15, deadline=None, derandomize=True)
    settings.register_profile("pykernels-long", max_examples=2000, deadline=None)
    want = os.environ.get("PYKERNELS_FUZZ", "")
    if want.isdigit():
        settings.register_profile("pykernels-env", max_examples=int(want), deadline=None)
    settings.load_profile("pykernels-env" if want.isdigit() else "pykernels-long" if want == "long" else "pykernels-ci")


_fuzz_profiles()

# ---- native CPU ISA tiers (csrc/cpu/cpu.h) ---------------------------------------------------------------
# The correctness matrix of these files runs the native backend once per tier this CPU can run
# (amx, avx512, avx2, portable); PYKERNELS_CPU_ISA pins it to that one tier. Other backends run once.
_ISA_FILES = {"test_gemm.py", "test_attention.py", "test_decode.py"}


def _cpu_isas() -> tuple[str | None, list[str | None]]:
    try:
        from pykernels import _C
    except ImportError:
        return None, [None]
    active = _C.cpu_isa()
    return active, ([active] if os.environ.get("PYKERNELS_CPU_ISA") else list(_C.cpu_isas()))


_ISA_DEFAULT, _ISAS = _cpu_isas()


def pytest_generate_tests(metafunc):
    if "native_isa" not in metafunc.fixturenames:
        return
    if metafunc.definition.path.name in _ISA_FILES and "backend" in metafunc.fixturenames and _ISA_DEFAULT:
        metafunc.parametrize("native_isa", _ISAS, indirect=True, ids=lambda t: f"isa-{t}")


def pytest_collection_modifyitems(config, items):
    """Only the native backend runs on the non-default tiers: deselect the other backends' copies."""
    drop = [it for it in items if getattr(it, "callspec", None) is not None
            and it.callspec.params.get("native_isa") not in (None, _ISA_DEFAULT)
            and it.callspec.params.get("backend") != "native"]
    if drop:
        ids = {id(it) for it in drop}
        items[:] = [it for it in items if id(it) not in ids]
        config.hook.pytest_deselected(items=drop)


@pytest.fixture(autouse=True)
def native_isa(request):
    """The native CPU tier of this test (None: leave it as it is)."""
    isa = getattr(request, "param", None)
    if isa is None or isa == _ISA_DEFAULT:
        yield isa
        return
    from pykernels import _C

    _C.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        _C.set_cpu_isa(_ISA_DEFAULT)
