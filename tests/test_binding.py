"""The raw extension rejects what it can check on its own instead of trusting its caller."""

import pytest
import torch

from pykernels import _C

F32, BF16 = 0, 2


def test_null_pointers():
    a = torch.randn(4, 4)
    with pytest.raises(ValueError, match="'a' is a null pointer"):
        _C.gemm(0, a.data_ptr(), a.data_ptr(), 4, 4, 4, F32)
    with pytest.raises(ValueError, match="'c' is a null pointer"):
        _C.gemm(a.data_ptr(), a.data_ptr(), 0, 4, 4, 4, F32)


@pytest.mark.parametrize("arg", ["M", "N", "K"])
@pytest.mark.parametrize("bad", [0, -1, -(2**62)])
def test_sizes_must_be_positive(arg, bad):
    a = torch.randn(4, 4)
    sizes = {"M": 4, "N": 4, "K": 4, arg: bad}
    with pytest.raises(ValueError, match=f"'{arg}' must be >= 1"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), sizes["M"], sizes["N"], sizes["K"], F32)


def test_overflowing_sizes():
    a = torch.randn(4, 4)
    with pytest.raises(ValueError, match="too large"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), 2**40, 2**40, 4, F32)
    with pytest.raises(ValueError, match="too large"):
        _C.attention(a.data_ptr(), a.data_ptr(), a.data_ptr(), a.data_ptr(), 2**20, 2**20, 1, 2**20, 64, 0.1,
                     False, F32)


def test_bad_dtype_and_device():
    a = torch.randn(4, 4)
    with pytest.raises(ValueError, match="'dtype'"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), 4, 4, 4, 7)
    with pytest.raises(ValueError, match="'device'"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), 4, 4, 4, F32, 5)


def test_cpu_float16_is_a_clear_error():
    a = torch.randn(4, 4).half()
    with pytest.raises(ValueError, match="float16"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), 4, 4, 4, 1)


def test_cuda_without_cuda_build_or_device():
    a = torch.randn(4, 4)
    # Built with CUDA: a host pointer is not device memory. Built without: a clear "built without CUDA".
    with pytest.raises((ValueError, TypeError), match="not CUDA device memory|built without CUDA"):
        _C.gemm(a.data_ptr(), a.data_ptr(), a.data_ptr(), 4, 4, 4, F32, 1)


def test_attention_gqa_and_head_dim_and_scale():
    t = torch.randn(1, 4, 8, 64)
    p = t.data_ptr()
    with pytest.raises(ValueError, match="multiple of 'Hkv'"):
        _C.attention(p, p, p, p, 1, 4, 3, 8, 64, 0.1, False, F32)
    with pytest.raises(ValueError, match="'D' must be >= 1"):  # any D >= 1 on CPU (tier kernels or portable code)
        _C.attention(p, p, p, p, 1, 2, 1, 8, 0, 0.1, False, F32)
    o = torch.empty(1, 2, 8, 40)  # D 40 on the portable attention; t holds the inputs (2 heads x 8 x 40 floats)
    _C.attention(p, p, p, o.data_ptr(), 1, 2, 1, 8, 40, 0.1, False, F32)
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match="'scale'"):
        _C.attention(p, p, p, p, 1, 4, 1, 8, 64, float("nan"), False, F32)


def _decode_args(lens, table=None, num_blocks=4, block_size=8, max_blocks=2, B=2):
    q = torch.randn(B, 2, 64)
    cache = torch.randn(num_blocks, 1, block_size, 64)
    o = torch.empty_like(q)
    keep = (q, cache, o, lens, table)
    args = [q.data_ptr(), cache.data_ptr(), cache.data_ptr(), o.data_ptr(), lens.data_ptr(),
            0 if table is None else table.data_ptr(), B, 2, 1, 64, num_blocks, block_size, max_blocks, 0.125, F32]
    return keep, args


def test_decode_checks_host_metadata():
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    _keep, args = _decode_args(torch.tensor([16, 17], dtype=torch.int32), table)
    with pytest.raises(ValueError, match=r"context_lens\[1\] = 17"):
        _C.decode(*args)
    _keep, args = _decode_args(torch.tensor([16, 9], dtype=torch.int32), torch.tensor([[0, 1], [2, 9]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9"):
        _C.decode(*args)
    # An unused entry (past the sequence's blocks) is not an error.
    _keep, args = _decode_args(torch.tensor([16, 8], dtype=torch.int32), torch.tensor([[0, 1], [2, -5]], dtype=torch.int32))
    _C.decode(*args)


def test_decode_contiguous_layout_consistency():
    _keep, args = _decode_args(torch.tensor([4, 4], dtype=torch.int32), None, num_blocks=3, max_blocks=1)
    with pytest.raises(ValueError, match="contiguous cache"):
        _C.decode(*args)


def test_features_and_build_info():
    f = _C.cpu_features()
    assert set(f) >= {"avx2_fma", "avx512f", "avx512_bf16", "amx_bf16"}
    info = _C.build_info()
    assert isinstance(info["cuda"], bool) and info["omp_max_threads"] >= 1
