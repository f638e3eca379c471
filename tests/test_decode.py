import pytest
import torch
from conftest import DEVICES, run_checked

from pykernels.kernels import DecodeProblem

# (B, Hq, Hkv, context, D, paged, block_size, ragged)
SHAPES = [
    (1, 1, 1, 1, 64, False, 16, False),
    (3, 8, 8, 100, 128, False, 16, True),
    (4, 32, 8, 1000, 128, True, 16, True),
    (2, 8, 1, 65, 64, True, 7, True),        # MQA, odd block size
    (5, 16, 2, 513, 128, True, 32, True),
    (1, 32, 4, 4096, 128, False, 16, False),  # one long sequence: the context is split across threads
    (2, 4, 4, 3, 64, True, 1, True),         # block size 1
    (8, 32, 32, 257, 128, True, 16, False),
    (1, 32, 1, 3000, 128, True, 16, False),   # MQA, paged, split: one item per chunk of every head
    (2, 10, 2, 2000, 64, True, 16, True),     # g = 5 (a block of 4 heads + 1), split, ragged
    (1, 6, 2, 700, 128, False, 16, False),    # g = 3, split
    (3, 4, 2, 129, 128, True, 16, True),     # g = 2 at D = 128 (P.V over whole rows), odd context
]
DTYPES = [torch.float32, torch.bfloat16]


def _id(s):
    B, Hq, Hkv, L, D, paged, bs, ragged = s
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-D{D}-" + (f"paged{bs}" if paged else "contig") + ("-ragged" if ragged else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_decode_matches_reference(shape, backend, dtype, device):
    run_checked(DecodeProblem(*shape), dtype, backend, device)


@pytest.mark.parametrize("D", [8, 40, 72, 80, 96, 256])
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["native"])  # every tier (conftest's native_isa)
def test_native_cpu_decode_any_head_dim(D, paged, dtype, backend, native_isa):
    """On CPU the native decode takes any head dim: 64 and 128 on the tier's kernels, any other on the portable
    decode (a padded row where D is not a whole number of vectors, bf16 outside pairs where it is not a whole
    number of pairs), whatever the tier; its result records that code. CUDA keeps 64 and 128."""
    from pykernels.backends import registry

    p = DecodeProblem(3, 8, 2, 150, D, paged=paged, block_size=16, ragged=True)
    run_checked(p, dtype, backend, "cpu")
    native = registry.all_backends()[backend]
    assert native.describe_call("decode", p.make_inputs(dtype))["cpu_isa"] == "portable"
    assert native.describe_call("decode", {"q": torch.empty(1, 1, 128)})["cpu_isa"] == native_isa  # the tier's own
    assert "head dims" in native.supports("decode", "cuda", torch.float16, D=D)


@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_decode_torch_compile(paged):
    run_checked(DecodeProblem(3, 8, 2, 77, 64, paged=paged, block_size=16, ragged=True), torch.float32,
                "torch_compile", "cpu")


def _poison_unread(x, bs):
    """Paged inputs x (blocks of bs rows): rows past each context in its last block and the blocks no sequence owns
    get K = 1e4 and V = NaN, so a kernel that reads any of them changes its answer."""
    lens, table, used = x["context_lens"], x["block_table"], set()
    for b in range(len(lens)):
        n = int(lens[b])
        used.update(int(t) for t in table[b, : (n + bs - 1) // bs])
        last = int(table[b, (n - 1) // bs])
        x["k_cache"][last, :, (n - 1) % bs + 1:] = 1e4
        x["v_cache"][last, :, (n - 1) % bs + 1:] = float("nan")
    for blk in set(range(x["k_cache"].shape[0])) - used:
        x["k_cache"][blk] = 1e4
        x["v_cache"][blk] = float("nan")


@pytest.mark.parametrize("backend", ["native", "torch", "jax", "opencl"])
def test_decode_ignores_cache_rows_past_the_length(backend):
    """Rows beyond context_lens[b] (and unused blocks) must not change the answer, even if they hold NaN."""
    import pykernels as pk
    from pykernels.backends import registry

    b_ = registry.all_backends().get(backend)
    if b_ is None or registry.info(b_).reason:
        pytest.skip(f"backend {backend!r} is not available here")
    p = DecodeProblem(3, 8, 2, 64, 64, paged=True, block_size=16, ragged=True)
    x = p.make_inputs(torch.float32)
    out1 = pk.decode(**x, backend=backend)
    _poison_unread(x, 16)
    out2 = pk.decode(**x, backend=backend)
    assert torch.equal(out1, out2)


@pytest.mark.parametrize("step", [16, 32, 64, 128])
def test_native_decode_every_paged_step(step):
    """The AVX-512 decode reads a paged cache in steps of cpu.h paged_step() tokens of one kv head (16..128,
    raised to a whole block; `pykernels tune` picks it per machine): every step matches the float64 reference on
    blocks shorter and longer than a step and not a divisor of it, GQA groups of 1, 3 and 4, a split context and
    ragged ones, and reads no row past a context nor a block the sequence does not own (_poison_unread)."""
    import pykernels as pk
    from pykernels import _C
    from pykernels.harness import verify

    if not {"avx512", "amx"} & set(_C.cpu_isas()):
        pytest.skip("the paged step belongs to the AVX-512 decode; this CPU has no AVX-512")
    before = _C.cpu_features()
    try:
        _C.set_cpu_paged_step(step, source="a test")
        f = _C.cpu_features()
        assert (f["paged_step"], f["paged_step_source"]) == (step, "a test")
        for B, Hq, Hkv, L, D, bs, ragged in ((3, 8, 2, 300, 128, 16, True), (2, 9, 3, 333, 64, 8, True),
                                             (2, 8, 8, 200, 128, 48, True), (1, 8, 2, 1000, 128, 16, False),
                                             (2, 4, 4, 150, 64, 256, True), (3, 8, 2, 77, 128, 32, True)):
            p = DecodeProblem(B, Hq, Hkv, L, D, paged=True, block_size=bs, ragged=ragged)
            for dt in (torch.float32, torch.bfloat16):
                x = p.make_inputs(dt, seed=1)
                exp = verify.expected(p, x)
                _poison_unread(x, bs)
                exp.assert_close(pk.decode(**x, backend="native"), f"step {step} {p.label()} {dt}")
    finally:
        _C.set_cpu_paged_step(before["paged_step"], source=before["paged_step_source"])


def test_decode_paged_equals_contiguous():
    import pykernels as pk
    from pykernels.kernels.decode import gather_cache

    x = DecodeProblem(4, 16, 4, 200, 128, paged=True, block_size=16, ragged=True).make_inputs(torch.float32)
    k = gather_cache(x["k_cache"], x["block_table"]).contiguous()
    v = gather_cache(x["v_cache"], x["block_table"]).contiguous()
    a = pk.decode(x["q"], x["k_cache"], x["v_cache"], x["context_lens"], block_table=x["block_table"])
    b = pk.decode(x["q"], k, v, x["context_lens"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_nan_inside_the_context_propagates(dtype, split, backend):
    """A NaN in a K row the sequence attends to must reach that sequence's output (and no other's):
    a kernel that masks it away would hide a corrupted cache. split: one long sequence, whose context
    the native kernel splits across threads, so the NaN sits in one chunk's partial."""
    import pykernels as pk

    p = DecodeProblem(1, 4, 1, 3000, 64) if split else DecodeProblem(3, 4, 2, 100, 64, ragged=True)
    x = p.make_inputs(dtype)
    x["k_cache"][0, 0, 37, 5] = float("nan")  # contiguous cache [B, Hkv, L, D]: sequence 0, kv head 0
    out = pk.decode(**x, backend=backend)
    assert torch.isnan(out[0, :2 if not split else 4]).all()
    if not split:
        assert not torch.isnan(out[0, 2:]).any() and not torch.isnan(out[1:]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["split", "whole", "paged"])
def test_decode_running_max_moves(case, dtype):
    """Scores that climb along the context (a slow ramp of ~90 in all, base e, plus a jump of +40 for a
    few tokens in the middle): the running max must move many times, by less and by more than the
    native kernel's lazy-rescaling threshold (2^8), and the answer still match the float64 reference.
    split: one long sequence whose context is cut into chunks (each chunk has its own max)."""
    import pykernels as pk
    from pykernels.harness import verify

    p = {"split": DecodeProblem(1, 8, 2, 3000, 64), "whole": DecodeProblem(3, 8, 2, 700, 128, ragged=True),
         "paged": DecodeProblem(2, 8, 2, 500, 128, paged=True, block_size=16)}[case]
    x = p.make_inputs(torch.float32)
    q, k, g = x["q"].double(), x["k_cache"], p.Hq // p.Hkv
    scale = p.D ** -0.5
    for b in range(p.B):
        for hk in range(p.Hkv):
            u = q[b, hk * g] / (scale * q[b, hk * g].dot(q[b, hk * g]))  # adds 1 to head hk*g's score
            for t in range(int(x["context_lens"][b])):
                bump = 0.03 * t + (40.0 if p.context // 2 <= t < p.context // 2 + 5 else 0.0)
                if p.paged:
                    k[int(x["block_table"][b, t // 16]), hk, t % 16] += (bump * u).float()
                else:
                    k[b, hk, t] += (bump * u).float()
    x = {n: v.to(dtype) if v is not None and v.is_floating_point() else v for n, v in x.items()}
    exp = verify.expected(p, x)
    exp.assert_close(pk.decode(**x, backend="native"), what=f"native {case} {dtype}")


_GUARD_SCRIPT = r"""
torch.manual_seed(0)
for isa in _C.cpu_isas():
    _C.set_cpu_isa(isa)
    for dtype in (torch.float32, torch.bfloat16):
        for D, Hq, Hkv in ((128, 4, 1), (64, 8, 2), (128, 1, 1)):
            for L in (1, 5, 16, 17, 31, 33, 47, 70, 100):
                q = torch.randn(1, Hq, D).to(dtype)
                k = at_guard((1, Hkv, L, D), dtype)
                v = at_guard((1, Hkv, L, D), dtype)
                k.copy_(torch.randn(1, Hkv, L, D))
                v.copy_(torch.randn(1, Hkv, L, D))
                lens = torch.tensor([L], dtype=torch.int32)
                out = pk.decode(q, k, v, lens, backend="native")
                ref = pk.decode(q, k, v, lens, backend="torch")
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (isa, dtype, D, Hq, Hkv, L, err)
print("ok")
"""


def test_decode_reads_nothing_past_the_context():
    """Every native tier on K/V caches that end at an inaccessible page, with contexts that end inside a
    16-token group or a 64-token tile: a read past the context crashes the child process (an AMX q.K that
    loaded a partial group as a whole tile did; the NaN-padding tests cannot see such reads, the extra
    rows' scores are masked). In a subprocess so that a crash fails this test, not the run."""
    import guard_pages

    pytest.importorskip("pykernels._C")
    r = guard_pages.run(_GUARD_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
