"""The OpenCL port (examples/opencl_port, a plugin): every family against the float64 reference on odd
shapes, through its entry point; its availability reason without pyopencl. Skipped with the backend's
reason when the plugin is not installed or no OpenCL platform exists (CI installs PoCL and the plugin)."""

import sys

import pytest
import torch
from conftest import run_checked

from pykernels.backends import registry
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem


def _backend():
    b = registry.all_backends().get("opencl")
    if b is None:
        pytest.skip("the opencl plugin is not installed (pip install ./examples/opencl_port)")
    return b


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (1, 1000, 65), (7, 63, 127), (8, 1025, 33), (9, 65, 63), (65, 127, 63), (127, 65, 1025),
                                 (200, 1023, 300)], ids=lambda s: "x".join(map(str, s)))
def test_opencl_gemm(mnk, dtype):
    _backend()
    run_checked(GemmProblem(*mnk), dtype, "opencl", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64), (1, 2, 2, 7, 128), (2, 4, 1, 63, 64), (1, 8, 2, 65, 128),
                                   (1, 2, 1, 300, 64)], ids=lambda s: "-".join(map(str, s)))
def test_opencl_attention(shape, causal, dtype):
    _backend()
    run_checked(AttentionProblem(*shape, causal=causal), dtype, "opencl", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64, False, 16, False), (3, 8, 8, 100, 128, False, 16, True),
                                   (2, 8, 1, 65, 64, True, 7, True), (2, 4, 4, 3, 64, True, 1, True),
                                   (2, 10, 2, 700, 128, True, 16, True)],
                         ids=lambda s: "-".join(map(str, s)))
def test_opencl_decode(shape, dtype):
    _backend()
    run_checked(DecodeProblem(*shape), dtype, "opencl", "cpu")


def test_opencl_head_dim_limit_is_a_clear_error():
    b = _backend()
    assert "head dims up to 256" in b.supports("attention", "cpu", torch.float32, D=512)


def test_opencl_unavailable_without_pyopencl(monkeypatch):
    b = _backend()
    monkeypatch.setitem(sys.modules, "pyopencl", None)
    reason = type(b)().availability()
    assert reason is not None and "pyopencl is not installed" in reason
