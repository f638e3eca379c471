"""pykernels' Triton kernels: correctness through Triton's interpreter on CPU (`triton_interpret`, small odd
shapes so that it stays fast), the same cases compiled on CUDA (`triton`, skipped without a GPU), and the
isolation of the interpreter mode from the rest of the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import run_checked

import pykernels as pk
from pykernels.backends import registry
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")

from pykernels import triton as pkt  # after the importorskip above

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tests that run interpreted kernels directly (run_checked skips on its own, with the backend's reason).
_interp_reason = registry.info(registry.all_backends()["triton_interpret"]).reason
needs_interpreter = pytest.mark.skipif(_interp_reason is not None,
                                       reason=f"triton_interpret unavailable: {_interp_reason}")

# Interpreter tiles are 32 (gemm), 32 x 16 (attention) and 16 tokens / 32-token chunks (decode), see the
# kernel modules: the sizes below sit on both sides of one and two tiles.
GEMM_SHAPES = [  # (M, N, K) from {1, 7, 33, 65}: every value in every position, partial tiles everywhere
    (1, 1, 1), (1, 65, 33), (7, 33, 65), (33, 7, 1), (65, 1, 7), (33, 33, 33), (65, 65, 65), (7, 7, 7),
    (1, 33, 65), (65, 7, 33),
    (97, 70, 40),  # 4 x 3 tiles with GROUP_M=2: two tile-row groups, the last one partial
]
ATTN_S = [1, 17, 65]
DECODE_SHAPES = [  # (B, Hq, Hkv, context, D, paged, block_size, ragged)
    (1, 1, 1, 1, 64, False, 16, False),
    (3, 4, 4, 70, 128, False, 16, True),   # 3 chunks for the longest sequence, 1 for the shortest
    (2, 8, 2, 65, 64, False, 16, True),    # GQA 4
    (2, 8, 1, 40, 128, True, 16, True),    # GQA 8 (MQA), paged
    (3, 8, 2, 77, 64, True, 7, True),      # pages that do not divide the tile
    (2, 4, 4, 5, 128, True, 1, True),      # block size 1
    (2, 8, 1, 33, 64, True, 32, False),    # one page per chunk
]


def _gemm_id(s):
    return "M{}-N{}-K{}".format(*s)


def _decode_id(s):
    B, Hq, Hkv, L, D, paged, bs, ragged = s
    layout = f"paged{bs}" if paged else "contig"
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-D{D}-{layout}" + ("-ragged" if ragged else "")


# --- through the interpreter on CPU ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=_gemm_id)
def test_gemm_interpret(shape, dtype):
    run_checked(GemmProblem(*shape), dtype, "triton_interpret", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gqa", [1, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("S", ATTN_S, ids=lambda s: f"S{s}")
def test_attention_interpret(S, D, causal, gqa, dtype):
    # Two sequences in the GQA cases (batch offsets), one in the others (the interpreter is slow).
    B = 2 if gqa > 1 else 1
    run_checked(AttentionProblem(B, 4, 4 // gqa, S, D, causal=causal), dtype, "triton_interpret", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=_decode_id)
def test_decode_interpret(shape, dtype):
    run_checked(DecodeProblem(*shape), dtype, "triton_interpret", "cpu")


@needs_interpreter
def test_decode_never_reads_past_the_length():
    """Rows past context_lens[b], blocks no sequence owns and unused table entries hold garbage (NaN, huge
    values, out-of-range block numbers): the answer does not change."""
    p = DecodeProblem(3, 8, 2, 50, 64, paged=True, block_size=16, ragged=True)
    x = p.make_inputs(torch.float32)
    out1 = pk.decode(**x, backend="triton_interpret")
    lens, table = x["context_lens"], x["block_table"]
    used = set()
    for b in range(p.B):
        n = int(lens[b])
        nb = (n + 15) // 16
        used.update(int(t) for t in table[b, :nb])
        last = int(table[b, nb - 1])
        x["k_cache"][last, :, (n - 1) % 16 + 1:] = 1e4
        x["v_cache"][last, :, (n - 1) % 16 + 1:] = float("nan")
        table[b, nb:] = 2**30  # unused table entries are unspecified: must not even be dereferenced
    for blk in range(x["k_cache"].shape[0]):
        if blk not in used:
            x["k_cache"][blk] = 1e4
            x["v_cache"][blk] = float("nan")
    out2 = pk.decode(**x, backend="triton_interpret")
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)


@needs_interpreter
def test_unsupported_head_dim_is_refused():
    q = torch.zeros(1, 2, 5, 96)
    with pytest.raises(pk.UnsupportedError, match="head dims"):
        pk.attention(q, q, q, backend="triton_interpret")


@needs_interpreter
def test_describe_call_records_the_autotuned_gemm_config():
    b = registry.get("triton_interpret")
    p = GemmProblem(33, 7, 65)
    x = p.make_inputs(torch.float32)
    pk.gemm(**x, backend="triton_interpret")
    info = b.describe_call("gemm", x)
    assert info["interpreted"] is True
    assert "BLOCK_M=32" in info["config"] and "num_warps" in info["config"]
    d = DecodeProblem(2, 8, 2, 65, 64, paged=True, ragged=True).make_inputs(torch.float32)
    assert "CHUNK=" in b.describe_call("decode", d)["config"]


# --- interpreter isolation ---------------------------------------------------------------------------


def _lang_identities():
    return {n: getattr(tl, n) for n in ("load", "store", "dot", "reduce", "full", "where", "range")} | {
        "tensor.__add__": tl.tensor.__add__, "tensor.__bool__": getattr(tl.tensor, "__bool__", None)}


@needs_interpreter
def test_interpret_mode_does_not_leak():
    env_before = os.environ.get("TRITON_INTERPRET")
    knob_before = triton.knobs.runtime.interpret
    lang_before = _lang_identities()
    for fam, p in (("gemm", GemmProblem(7, 33, 65)),
                   ("attention", AttentionProblem(1, 2, 1, 17, 64, causal=True)),
                   ("decode", DecodeProblem(2, 4, 2, 20, 64, paged=True, ragged=True))):
        getattr(pk, fam)(**p.make_inputs(torch.bfloat16), **p.call_kwargs(), backend="triton_interpret")
    assert os.environ.get("TRITON_INTERPRET") == env_before
    assert triton.knobs.runtime.interpret == knob_before
    assert _lang_identities() == lang_before, "the interpreter left triton.language patched"

    for fam in pkt.FAMILIES:
        compiled, interpreted = pkt.load(fam, interpret=False), pkt.load(fam, interpret=True)
        assert compiled is not interpreted
        assert compiled.__file__ == interpreted.__file__  # the same kernel source
        assert not any(pkt.is_interpreted(k) for k in compiled.KERNELS), fam
        assert all(pkt.is_interpreted(k) for k in interpreted.KERNELS), fam
        assert not compiled.INTERPRETED and interpreted.INTERPRETED
    # The helpers that interpreted kernels call are interpreted too (looked up in their module's namespace).
    assert pkt.is_interpreted(pkt.load("attention", interpret=True)._attn_tiles)
    assert not pkt.is_interpreted(pkt.load("attention", interpret=False)._attn_tiles)

    # A kernel decorated after all this, anywhere else, follows the process's own setting.
    def _later(x_ptr):
        pass

    assert type(triton.jit(_later)).__name__ == ("InterpretedFunction" if knob_before else "JITFunction")


@pytest.mark.parametrize("env", [None, "0", "1"], ids=["unset", "0", "1"])
def test_mode_scope_restores_the_environment(env, monkeypatch):
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    for interpret in (True, False):
        mod = pkt._import_copy("gemm", interpret)  # a fresh decoration in each mode
        assert pkt.is_interpreted(mod.KERNELS[0]) is interpret
        assert os.environ.get("TRITON_INTERPRET") == env


def test_mode_scope_respects_an_explicit_knob(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    runtime = triton.knobs.runtime
    runtime.interpret = False  # explicit setting (also writes the env var, which monkeypatch restores)
    try:
        assert pkt.is_interpreted(pkt._import_copy("decode", True).KERNELS[0])
        assert runtime.__dict__.get("interpret") is False  # the explicit setting is back
    finally:
        del runtime.interpret


FIRST_TOUCH = """
import os, sys
from pykernels import triton as pkt
assert "triton" not in sys.modules
mod = pkt.load("decode", interpret=True)  # the process's first import of triton happens in here
assert pkt.is_interpreted(mod.KERNELS[0])
import triton, triton.language as tl
assert os.environ.get("TRITON_INTERPRET") is None
assert type(tl.max).__name__ == type(tl.cdiv).__name__ == "JITFunction", type(tl.max)

@triton.jit
def later(x_ptr):
    pass

assert type(later).__name__ == "JITFunction", type(later)
print("ok")
"""


def test_first_triton_import_inside_the_interpreted_scope_does_not_leak(tmp_path):
    """Triton's own @jit library (tl.max, tl.cdiv, ...) is decorated when triton.language is first imported:
    that must not happen while TRITON_INTERPRET is set for the interpreted instance."""
    script = tmp_path / "first_touch.py"
    script.write_text(FIRST_TOUCH)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True,
                       timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_import_pykernels_without_triton():
    """A missing triton makes both backends unavailable with the reason; import pykernels still works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import pykernels as pk\n"
        "infos = {b.name: b for b in pk.backends()}\n"
        "for n in ('triton', 'triton_interpret'):\n"
        "    assert not infos[n].available and 'triton is not importable' in infos[n].reason, infos[n]\n"
        "assert infos['torch'].available\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_backend_declarations():
    infos = {b.name: b for b in pk.backends()}
    assert infos["triton"].tier == infos["triton_interpret"].tier == "abstraction"
    assert infos["triton"].devices == ("cuda",) and infos["triton_interpret"].devices == ("cpu",)
    assert "correctness only" in infos["triton_interpret"].description
    if not torch.cuda.is_available():
        # no CUDA device (or, with TRITON_INTERPRET=1 in the environment, Triton is interpreted process-wide)
        assert not infos["triton"].available and infos["triton"].reason


# --- compiled, on CUDA -------------------------------------------------------------------------------

cuda = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

CUDA_GEMM = GEMM_SHAPES + [
    (1, 4096, 4096), (64, 4096, 11008), (127, 1000, 1025), (1023, 1025, 257), (2048, 2048, 2048),
]
CUDA_ATTN = [  # (B, Hq, Hkv, S, D)
    (1, 2, 2, 1, 64), (1, 4, 1, 17, 128), (2, 8, 2, 65, 64), (1, 4, 4, 127, 128), (1, 8, 1, 1000, 128),
    (2, 4, 2, 1025, 64),
]
CUDA_DECODE = DECODE_SHAPES + [
    (4, 32, 8, 1000, 128, True, 16, True), (1, 32, 4, 4096, 128, False, 16, False),
    (8, 32, 32, 257, 128, True, 16, False), (5, 16, 2, 513, 128, True, 32, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [pytest.param(s, marks=cuda) for s in CUDA_GEMM], ids=_gemm_id)
def test_gemm_cuda(shape, dtype):
    run_checked(GemmProblem(*shape), dtype, "triton", "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [pytest.param(s, marks=cuda) for s in CUDA_ATTN],
                         ids=lambda s: "B{}-Hq{}-Hkv{}-S{}-D{}".format(*s))
def test_attention_cuda(shape, causal, dtype):
    run_checked(AttentionProblem(*shape, causal=causal), dtype, "triton", "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [pytest.param(s, marks=cuda) for s in CUDA_DECODE], ids=_decode_id)
def test_decode_cuda(shape, dtype):
    run_checked(DecodeProblem(*shape), dtype, "triton", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_describe_call_and_compiled_kernels():
    b = registry.get("triton")
    x = GemmProblem(257, 512, 1024).make_inputs(torch.float16, device="cuda")
    pk.gemm(**x, backend="triton")
    assert "BLOCK_M=" in b.describe_call("gemm", x)["config"]
    for fam in pkt.FAMILIES:
        assert not any(pkt.is_interpreted(k) for k in b._mod(fam).KERNELS)
