import pytest
import torch
from conftest import CORE_BACKENDS, DEVICES, run_checked

from pykernels.kernels import GemmProblem

# Odd sizes around the block sizes of the kernels (1, 7, 63/64/65, 127, 1000, 1023/1025) and powers of two.
SHAPES = [
    (1, 1, 1),
    (1, 1000, 65),
    (1, 4096, 4096),       # GEMV path
    (4, 1025, 1023),
    (3, 200, 500),         # direct path on 2 threads below kSerialFlops (few_rows_threads): 8 items of K, partials
    (7, 63, 127),
    (12, 1500, 130),       # direct path in two passes of rows (zmm at full width), two column chunks; AMX M < 16
    (10, 3000, 333),       # two passes of 5 rows, two even column chunks, the next item prefetched, a short last item
    (15, 129, 1030),
    (16, 256, 1000),
    (13, 200, 300),        # fp32 avx512: in place from 4 rows on a small B (7 + 6 rows, an 8-column last panel)
    (64, 64, 64),          # fp32 avx512: in place (A and B read where they are); other tiers and dtypes packed
    (17, 37, 29),          # in place: 8- and 9-row panels, a full and a 5-column panel
    (200, 45, 90),         # in place: 15 row panels, a 13-column last panel, threads below kSerialFlops
    (150, 200, 120),       # in place on two threads: row panels x column groups
    (24, 48, 1000),        # in place at K near kInPlaceMaxK, two threads
    (300, 130, 260),       # in place past 16 row panels (22; A and B within L2), a 2-column last panel
    (20, 20, 2000),        # serial gemm_rows (K past the in-place path), C written directly
    (40, 300, 2000),       # few row panels on several threads, N split (gemm_cols): 5 column items, 8 K blocks
    (40, 150, 3000),       # few row panels and few column panels: the slabs (K split, partials summed)
    (65, 127, 63),
    (127, 65, 1025),
    (256, 512, 128),
    (1000, 7, 64),
    (200, 1023, 300),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mnk", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_reference(mnk, backend, dtype, device):
    run_checked(GemmProblem(*mnk), dtype, backend, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_torch_compile(dtype):
    run_checked(GemmProblem(65, 127, 63), dtype, "torch_compile", "cpu")


def test_gemm_is_deterministic():
    import pykernels as pk

    x = GemmProblem(129, 257, 513).make_inputs(torch.float32)
    assert torch.equal(pk.gemm(**x), pk.gemm(**x))


# pk.linear: the gemm family's layout "nt" (b stored [N, K]), on every native CPU tier (conftest): the small-M
# dot-product path (M <= 8), the packed drivers and the AMX tiles above it (several K blocks), and K tails that are no multiple of the vector width.
LINEAR_SHAPES = [(1, 1, 1), (1, 33, 4095), (3, 65, 1000), (5, 7, 129), (8, 130, 17), (9, 64, 64), (65, 127, 63),
                 (40, 300, 777), (16, 33, 32), (2, 67, 70), (4, 5, 9),
                 (20, 1100, 300),  # fp32 avx512: in place (few row panels, up to L2), B's panels transposed
                 (20, 1100, 1300),  # computed as C^T = B . A^T (gemm_nt_swapped): several K blocks
                 (13, 45, 1029),   # the dot path in two passes of rows (8 + 5), a short last block of B rows
                 (8, 70, 200),     # the dot path at 8 rows (fp32 avx512: shorter K, 8 x 130 x 17, runs in place)
                 (7, 41, 300),     # the dot path at 7 rows, one B row a step on the avx2 tier
                 (3, 200, 500),    # the dot path on 2 threads below kSerialFlops (kDotThreadFlops), a short last item
                 (260, 1100, 1901)]  # B packed once past the private copies (> 4 MB): pack_t's streaming stores, odd K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("mnk", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_reference(mnk, backend, dtype):
    run_checked(GemmProblem(*mnk, layout="nt"), dtype, backend, "cpu")


# The AMX tier's blockings (csrc/cpu/gemm_amx.cpp), on every native tier: several K blocks with the fp32
# accumulator, one row block packing its own B blocks (wide columns for B [K, N]), and several row blocks
# (and column blocks, with a short last K block); M <= 32 with B [K, N] splits K between the threads
# (12 x 1100 x 700: the half-slice tiles; 16 x 2048 x 8192: 32 chunks, so that every thread adds a partial).
BLOCK_SHAPES = [(33, 4100, 700, "nn"), (20, 70, 2100, "nt"), (20, 70, 2100, "nn"), (600, 300, 2200, "nn"),
                (600, 300, 2200, "nt"), (130, 4096, 1000, "nn"), (520, 1100, 600, "nn"),
                (12, 1100, 700, "nn"), (16, 2048, 8192, "nn")]


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("mnkl", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_block_paths_bf16(mnkl, backend):
    M, N, K, layout = mnkl
    run_checked(GemmProblem(M, N, K, layout=layout), torch.bfloat16, backend, "cpu")


# The packed drivers' path for a B too large to pack once (packed B > 32 MB, csrc/cpu/gemm.cpp
# kSharedPackedBBytes): every item packs its own B blocks, and its row group grows to what half of L2
# holds (one group of 11 panels here, several column blocks, K and N tails); "nt" with M past the swapped
# path (M > 256).
PER_ITEM_B_SHAPES = [(150, 2100, 4100, "nn"), (600, 2100, 4100, "nt")]
# And B packed once but past the private copies' 4 MB (kPrivatePackedBBytes): packed with non-temporal
# stores, read back by the items (bf16: BLOCK_SHAPES' 130 x 4096 x 1000).
SHARED_B_SHAPES = [(200, 1100, 1030, "nn")]


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("mnkl", PER_ITEM_B_SHAPES + SHARED_B_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_per_item_b_fp32(mnkl, backend):
    M, N, K, layout = mnkl
    run_checked(GemmProblem(M, N, K, layout=layout), torch.float32, backend, "cpu")


_GEMM_GUARD_SCRIPT = r"""
from pykernels.harness import verify
from pykernels.kernels import GemmProblem

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for M in (1, 2, 3, 4, 5, 8, 9, 12, 16, 17, 33):
        for N, K in ((1, 7), (33, 65), (100, 3), (1000, 37), (4100, 9)):
            a = at_guard((M, K), dtype)
            a.copy_(torch.randn(M, K))
            for layout, b_shape in (("nn", (K, N)), ("nt", (N, K))):  # "nt": linear, B stored [N, K]
                b = at_guard(b_shape, dtype)
                b.copy_(torch.randn(*b_shape))
                prob = GemmProblem(M, N, K, layout=layout)
                exp = verify.expected(prob, {"a": a, "b": b})  # the float64 reference and the tolerance, once
                for isa in _C.cpu_isas():
                    _C.set_cpu_isa(isa)
                    out = pk.gemm(a, b, backend="native") if layout == "nn" else pk.linear(a, b, backend="native")
                    exp.assert_close(out, f"{isa} {prob.label()} {dtype}")
print("ok")
"""


def test_gemm_reads_nothing_past_its_inputs():
    """Every native tier and path (direct rows with a masked last vector, packed, linear) on A and B that end
    at an inaccessible page, with widths that end inside a vector: a read past either crashes the child."""
    import guard_pages

    pytest.importorskip("pykernels._C")
    r = guard_pages.run(_GEMM_GUARD_SCRIPT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
