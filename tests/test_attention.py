import pytest
import torch
from conftest import DEVICES, run_checked

from pykernels.kernels import AttentionProblem
from pykernels.kernels._common import rel_error

# (B, Hq, Hkv, S, D): GQA ratios 1, 4 and 8, odd sequence lengths around the tile sizes.
SHAPES = [
    (1, 1, 1, 1, 64),
    (1, 2, 2, 7, 128),
    (2, 4, 1, 63, 64),     # MQA
    (1, 8, 2, 64, 128),    # GQA 4
    (1, 8, 1, 65, 64),     # GQA 8
    (1, 4, 2, 90, 64),     # a last key tile of 26: 2 of its 4 score vectors live
    (1, 6, 2, 40, 128),    # one query block per head (AVX2: each item packs its key tile itself)
    (1, 4, 4, 127, 128),
    (1, 2, 1, 300, 64),
    (1, 2, 2, 1000, 128),
    (3, 6, 3, 129, 64),    # 9 kv heads: the packed K/V ring (4 slots) wraps twice; a last key tile of 1
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_attention_matches_reference(shape, causal, backend, dtype, device):
    run_checked(AttentionProblem(*shape, causal=causal), dtype, backend, device)


@pytest.mark.parametrize("D", [1, 8, 16, 32, 40, 48, 72, 80, 96, 100, 112, 160, 200, 256, 264])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["native"])  # every tier (conftest's native_isa)
def test_native_cpu_attention_any_head_dim(D, causal, dtype, backend, native_isa):
    """On CPU the native attention takes any head dim: every tier's kernels any D up to 256 (the AVX-512, AVX2 and
    NEON ones run at D rounded up to 16 on zero-padded rows, the AVX-512 P.V passes of 64 columns ending in 32- and
    16-column ones: D 16, 48, 80, 96, 112, 160; the AMX bf16 kernel at D rounded up to 32), the portable attention
    any D (rows padded to whole pairs of vectors in its K / V packs; also every tier's code above 256, below); a last
    key tile of 6 live keys; the result records which code ran. CUDA keeps 64 and 128."""
    from pykernels.backends import registry

    p = AttentionProblem(2, 6, 2, 70, D, causal=causal)  # GQA 3
    run_checked(p, dtype, backend, "cpu")
    native = registry.all_backends()[backend]
    own = D <= 256  # every tier up to 256: rows zero-padded to a multiple of 16 (AMX: 32)
    assert native.describe_call("attention", p.make_inputs(dtype))["cpu_isa"] == (native_isa if own else "portable")
    assert native.describe_call("attention", {"q": torch.empty(1, 1, 1, 64)})["cpu_isa"] == native_isa
    assert native.describe_call("attention", {"q": torch.empty(1, 1, 1, 257)})["cpu_isa"] == "portable"
    assert native.supports("attention", "cpu", dtype, D=D) is None
    assert "head dims" in native.supports("attention", "cuda", torch.float16, D=D)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_float16_where_supported(device):
    # torch supports float16 everywhere; the native CPU kernel does not (and must say so, see test_validation).
    run_checked(AttentionProblem(1, 4, 2, 65, 64, causal=True), torch.float16, "torch", device)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_torch_compile(causal):
    run_checked(AttentionProblem(1, 4, 2, 65, 64, causal=causal), torch.float32, "torch_compile", "cpu")


def test_attention_explicit_scale():
    import pykernels as pk
    from pykernels.harness import verify

    p = AttentionProblem(1, 2, 1, 33, 64, causal=True)
    x = p.make_inputs(torch.float32)
    ref = verify.FAMILIES["attention"].reference(**x, causal=True, scale=0.3)
    out = pk.attention(**x, causal=True, scale=0.3)
    from pykernels.kernels import rel_error

    assert rel_error(out, ref) < 1e-4
    # A different scale must give a different answer (the scale is not ignored).
    assert rel_error(pk.attention(**x, causal=True), ref) > 1e-3


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("scale", [0.3, -0.2], ids=["scale0.3", "scale-0.2"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_bf16_explicit_scale(causal, scale, backend):
    # bf16 on every native tier (amx included) with a non-default scale, a negative one too (the AMX path
    # folds the sign of the scale into Q), GQA 2 and a length that is no multiple of any tile.
    import pykernels as pk
    from pykernels.harness import verify
    from pykernels.kernels import rel_error

    p = AttentionProblem(1, 4, 2, 97, 128, causal=causal)
    x = p.make_inputs(torch.bfloat16)
    ref = verify.FAMILIES["attention"].reference(**x, causal=causal, scale=scale)
    out = pk.attention(**x, causal=causal, scale=scale, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 2e-2
    assert rel_error(pk.attention(**x, causal=causal, backend=backend), ref) > 5e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [40, 64, 130])
def test_attention_many_kv_heads_repeated(S, dtype):
    # The native AVX-512 path packs each kv head's K/V into a ring of 4 slots while earlier heads' items run
    # (csrc/cpu/attention.cpp run_avx512): an item waits for its head's tiles, a tile for the items of the head
    # that held its slot before. With 64 kv heads of 1-3 tiles the packing runs right beside the items, so a missing
    # wait shows up as wrong rows within some calls (2-core Zen 5 VM: the slot wait removed, 4-6 of these 6 cases
    # failed in each of 3 runs; the tile wait removed, 1-3). Timing-dependent by nature: on one thread, or on tiers
    # that pack per item, it is a plain correctness check.
    import pykernels as pk
    from pykernels.harness import verify

    for causal in (False, True):
        prob = AttentionProblem(4, 16, 16, S, 128, causal=causal)
        x = prob.make_inputs(dtype, seed=S)
        exp = verify.expected(prob, x)  # the float64 reference and the dtype's tolerance, as run_checked
        ref_max = exp.reference.abs().max().item()
        for i in range(30):
            err = exp.assert_close(pk.attention(**x, causal=causal, backend="native"), what=f"call {i} {prob.label()}")
            if dtype == torch.bfloat16:  # and within the absolute bound this test was written with
                assert err * ref_max < 3e-2, (i, causal, err * ref_max)


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 16, 64), (1, 4, 1, 100, 128), (2, 2, 2, 300, 64)],
                         ids=lambda s: "-".join(map(str, s)))
def test_attention_causal_later_nonfinite_v_reaches_no_earlier_row(shape, bad, dtype, backend):
    """Under a causal mask row i depends on the V rows up to i only, so a NaN or inf further on (say, unused cache
    padding) must not reach it. Every native tier multiplies a diagonal tile's V rows by the P of the rows that
    must not see them, which is exactly 0 there, and 0 * inf is NaN; attention() recomputes the rows that got a
    NaN that way (csrc/cpu/attention.cpp, exact_causal_rows). The non-finite outputs must be exactly the
    reference's, and the rest within the tolerance of clean inputs."""
    import pykernels as pk
    from pykernels.harness import verify
    from pykernels.kernels import attention as attention_kernel

    B, Hq, Hkv, S, D = shape
    prob = AttentionProblem(B, Hq, Hkv, S, D, causal=True)
    x = prob.make_inputs(dtype, seed=S)
    tol = verify.expected(prob, x).tolerance
    v = x["v"]
    v[0, 0, S - 1, 3] = bad                # one element of the last row: only the last row of its heads sees it
    v[0, 0, 2, 7] = bad                    # column 7 from row 2 on: rows that see it there and must not see column 3's
    v[B - 1, Hkv - 1, S // 2 + 5, :] = bad  # a whole row halfway: the rows from there on see it, no row before
    ref = attention_kernel.reference(**x, causal=True)
    out = pk.attention(**x, causal=True, backend=backend).double()
    ref_bad, out_bad = ~torch.isfinite(ref), ~torch.isfinite(out)
    assert torch.equal(out_bad, ref_bad), (f"{int((out_bad & ~ref_bad).sum())} outputs non-finite that see no "
                                           f"non-finite value, {int((ref_bad & ~out_bad).sum())} finite that do")
    good = ~ref_bad
    err = rel_error(out[good], ref[good])
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_causal_nan_padding_tail(dtype, backend):
    """A batch padded at the end with garbage: K and V rows from position P on (off every block boundary) all NaN.
    Under a causal mask the rows before P see none of it and must come out finite and right; the rows from P on
    are NaN. (The native recompute of such rows, csrc/cpu/attention.cpp exact_causal_rows, skips the padded rows,
    whose NaN is their own.)"""
    import pykernels as pk
    from pykernels.harness import verify
    from pykernels.kernels import attention as attention_kernel

    B, Hq, Hkv, S, D, P = 1, 4, 2, 300, 128, 263
    prob = AttentionProblem(B, Hq, Hkv, S, D, causal=True)
    x = prob.make_inputs(dtype, seed=3)
    tol = verify.expected(prob, x).tolerance
    x["k"][:, :, P:] = float("nan")
    x["v"][:, :, P:] = float("nan")
    ref = attention_kernel.reference(**x, causal=True)
    out = pk.attention(**x, causal=True, backend=backend).double()
    assert bool(torch.isfinite(out[:, :, :P]).all()) and not bool(torch.isfinite(out[:, :, P:]).any())
    err = rel_error(out[:, :, :P], ref[:, :, :P])
    assert err <= tol, (err, tol)
