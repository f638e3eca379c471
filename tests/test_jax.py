"""The `jax` backend (pykernels/backends/jax_backend.py): every family against the float64 reference on
the odd shapes of the family tests, zero-copy DLPack, prepare(), and unavailability without JAX."""

import sys

import pytest
import torch
from conftest import run_checked
from test_attention import SHAPES as ATTENTION_SHAPES
from test_decode import SHAPES as DECODE_SHAPES
from test_decode import _id as decode_id
from test_gemm import SHAPES as GEMM_SHAPES

from pykernels.backends import registry
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

pytest.importorskip("jax", reason="jax is not installed (pip install -e '.[jax]')")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_jax_gemm(mnk, dtype):
    run_checked(GemmProblem(*mnk), dtype, "jax", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_jax_attention(shape, causal, dtype):
    run_checked(AttentionProblem(*shape, causal=causal), dtype, "jax", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=decode_id)
def test_jax_decode(shape, dtype):
    run_checked(DecodeProblem(*shape), dtype, "jax", "cpu")


def test_jax_float16_attention_and_decode():
    run_checked(AttentionProblem(1, 4, 2, 65, 64, causal=True), torch.float16, "jax", "cpu")
    run_checked(DecodeProblem(2, 8, 2, 77, 64, paged=True, block_size=16, ragged=True), torch.float16, "jax", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_jax_inputs_cross_by_dlpack_without_a_copy(dtype):
    from pykernels.backends.jax_backend import _to_jax, _to_torch

    t = torch.randn(33, 65).to(dtype)
    x = _to_jax(t)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    back = _to_torch(x)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr()
    info = registry.get("jax").describe_call("gemm", {"a": t, "b": t.T.contiguous()})
    assert info["dlpack_zero_copy"] is True and info["xla_platform"] == "cpu"


def test_jax_prepare_compiles_once_and_the_callable_is_correct():
    from pykernels.harness import verify

    be = registry.get("jax")
    p = AttentionProblem(1, 4, 2, 63, 64, causal=True)
    x = p.make_inputs(torch.bfloat16)
    fn = be.prepare("attention", q=x["q"], k=x["k"], v=x["v"], causal=True, scale=64 ** -0.5)
    exp = verify.expected(p, x)
    first, second = fn(), fn()
    exp.assert_close(second, what="jax prepared attention")
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()  # a new output each call
    assert be.describe_call("attention", {**x, "causal": True})["attention_impl"] == "xla"


def test_jax_unavailable_without_jax(monkeypatch):
    from pykernels.backends.jax_backend import JaxBackend

    monkeypatch.setitem(sys.modules, "jax", None)  # import jax raises ImportError
    reason = JaxBackend().availability()
    assert reason is not None and "jax is not installed" in reason and ".[jax]" in reason
