"""Bad input raises ValueError / TypeError naming the argument, for every backend (validation is shared)."""

import re

import pytest
import torch

import pykernels as pk
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

BACKENDS = ["native", "torch"]


def _gemm():
    return GemmProblem(5, 6, 7).make_inputs(torch.float32)


def _attn():
    return AttentionProblem(1, 4, 2, 9, 64).make_inputs(torch.float32)


def _dec(paged=True):
    return DecodeProblem(2, 4, 2, 20, 64, paged=paged, block_size=8, ragged=True).make_inputs(torch.float32)


def raises(exc, arg):
    return pytest.raises(exc, match=re.escape(f"'{arg}'"))


@pytest.mark.parametrize("backend", BACKENDS)
class TestGemm:
    def test_not_a_tensor(self, backend):
        x = _gemm()
        with raises(TypeError, "a"):
            pk.gemm(x["a"].tolist(), x["b"], backend=backend)

    def test_int_dtype(self, backend):
        x = _gemm()
        with raises(TypeError, "a"):
            pk.gemm(x["a"].to(torch.int32), x["b"].to(torch.int32), backend=backend)

    def test_mixed_dtypes(self, backend):
        x = _gemm()
        with raises(TypeError, "b"):
            pk.gemm(x["a"], x["b"].to(torch.bfloat16), backend=backend)

    def test_wrong_rank(self, backend):
        x = _gemm()
        with raises(ValueError, "a"):
            pk.gemm(x["a"][None], x["b"], backend=backend)

    def test_mismatched_inner_dim(self, backend):
        x = _gemm()
        with raises(ValueError, "b"):
            pk.gemm(x["a"], x["b"][:-1].contiguous(), backend=backend)

    def test_non_contiguous(self, backend):
        x = _gemm()
        with raises(ValueError, "b"):
            pk.gemm(x["a"], torch.randn(6, 7).t(), backend=backend)

    def test_empty(self, backend):
        with raises(ValueError, "a"):
            pk.gemm(torch.empty(0, 7), torch.empty(7, 6), backend=backend)

    def test_mixed_devices(self, backend):
        x = _gemm()
        with raises(ValueError, "b"):
            pk.gemm(x["a"], x["b"].to("meta"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
class TestAttention:
    def test_hq_not_multiple_of_hkv(self, backend):
        x = AttentionProblem(1, 4, 3, 9, 64).make_inputs(torch.float32)
        with raises(ValueError, "k"):
            pk.attention(**x, backend=backend)

    def test_mismatched_seq(self, backend):
        x = _attn()
        with raises(ValueError, "k"):
            pk.attention(x["q"], x["k"][:, :, :5].contiguous(), x["v"][:, :, :5].contiguous(), backend=backend)

    def test_k_v_differ(self, backend):
        x = _attn()
        with raises(ValueError, "v"):
            pk.attention(x["q"], x["k"], x["v"][..., :32].contiguous(), backend=backend)

    def test_wrong_rank(self, backend):
        x = _attn()
        with raises(ValueError, "q"):
            pk.attention(x["q"][0], x["k"], x["v"], backend=backend)

    def test_mixed_dtypes(self, backend):
        x = _attn()
        with raises(TypeError, "v"):
            pk.attention(x["q"], x["k"], x["v"].to(torch.bfloat16), backend=backend)

    def test_bad_scale(self, backend):
        x = _attn()
        for bad in (float("nan"), float("inf"), 0.0):
            with raises(ValueError, "scale"):
                pk.attention(**x, scale=bad, backend=backend)
        with raises(TypeError, "scale"):
            pk.attention(**x, scale="0.1", backend=backend)

    def test_bad_causal(self, backend):
        with raises(TypeError, "causal"):
            pk.attention(**_attn(), causal=1, backend=backend)

    def test_non_contiguous(self, backend):
        x = _attn()
        with raises(ValueError, "q"):
            pk.attention(x["q"].transpose(1, 2).contiguous().transpose(1, 2), x["k"], x["v"], backend=backend)


def test_head_dim_limit_belongs_to_the_backend():
    """A head dim a backend's kernels lack is that backend's UnsupportedError (test_triton: the Triton kernels' 64 /
    128), not the API's: native on CPU runs D 96 on its portable attention, as torch does, with the same answer."""
    x = AttentionProblem(1, 2, 1, 9, 96).make_inputs(torch.float32)
    torch.testing.assert_close(pk.attention(**x, backend="native"), pk.attention(**x, backend="torch"),
                               rtol=1e-5, atol=1e-5)


def test_native_cpu_rejects_float16_clearly():
    x = GemmProblem(3, 3, 3).make_inputs(torch.float16)
    with pytest.raises(pk.UnsupportedError, match="float16"):
        pk.gemm(**x, backend="native")


@pytest.mark.parametrize("backend", BACKENDS)
class TestDecode:
    def test_lens_out_of_range(self, backend):
        for paged in (False, True):
            x = _dec(paged)
            for bad in (0, -3, 10**6):
                x["context_lens"][1] = bad
                with raises(ValueError, "context_lens"):
                    pk.decode(**x, backend=backend)

    def test_lens_wrong_dtype(self, backend):
        x = _dec()
        x["context_lens"] = x["context_lens"].long()
        with raises(TypeError, "context_lens"):
            pk.decode(**x, backend=backend)

    def test_lens_wrong_count(self, backend):
        x = _dec()
        x["context_lens"] = x["context_lens"][:1].contiguous()
        with raises(ValueError, "context_lens"):
            pk.decode(**x, backend=backend)

    def test_block_table_out_of_cache(self, backend):
        for bad in (-1, 10**6):
            x = _dec()
            x["block_table"][0, 0] = bad
            with raises(ValueError, "block_table"):
                pk.decode(**x, backend=backend)

    def test_block_table_wrong_dtype(self, backend):
        x = _dec()
        x["block_table"] = x["block_table"].long()
        with raises(TypeError, "block_table"):
            pk.decode(**x, backend=backend)

    def test_contiguous_cache_batch_mismatch(self, backend):
        x = _dec(paged=False)
        with raises(ValueError, "k_cache"):
            pk.decode(x["q"][:1].contiguous(), x["k_cache"], x["v_cache"], x["context_lens"][:1].contiguous(),
                      backend=backend)

    def test_head_dim_mismatch(self, backend):
        x = _dec()
        with raises(ValueError, "k_cache"):
            pk.decode(torch.randn(2, 4, 128), x["k_cache"], x["v_cache"], x["context_lens"],
                      block_table=x["block_table"], backend=backend)

    def test_gqa_mismatch(self, backend):
        x = _dec()
        with raises(ValueError, "k_cache"):
            pk.decode(torch.randn(2, 3, 64), x["k_cache"], x["v_cache"], x["context_lens"],
                      block_table=x["block_table"], backend=backend)

    def test_empty_cache(self, backend):
        x = _dec(paged=False)
        with raises(ValueError, "k_cache"):
            pk.decode(x["q"], torch.empty(2, 2, 0, 64), torch.empty(2, 2, 0, 64), x["context_lens"], backend=backend)


class TestBackendNames:
    def test_unknown_backend_lists_known(self):
        with pytest.raises(ValueError, match="unknown backend 'nope'.*native"):
            pk.gemm(**_gemm(), backend="nope")

    def test_backend_must_be_str(self):
        with raises(TypeError, "backend"):
            pk.gemm(**_gemm(), backend=3)

    def test_family_not_implemented(self):
        with pytest.raises(pk.UnsupportedError, match="does not implement 'attention'"):
            pk.attention(**_attn(), backend="numpy")
