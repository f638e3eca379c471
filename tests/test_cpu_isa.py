"""The native CPU ISA tiers (csrc/cpu/cpu.h): selection, the override, and where the tier is recorded.

The correctness matrix of test_gemm / test_attention / test_decode runs on every tier through the
`native_isa` fixture of conftest.py; this file checks the switch itself."""

import os
import subprocess
import sys

import pytest
import torch

import pykernels as pk

_C = pytest.importorskip("pykernels._C")


def _child(code, **env):
    """Runs `code` in a child Python with `env` added to this environment (variables read at import)."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)


def test_tiers_listed_best_first_and_portable_always_there():
    isas = _C.cpu_isas()
    assert isas[-1] == "portable"
    order = ["amx", "avx512", "avx2", "neon", "portable"]
    assert isas == [t for t in order if t in isas]
    assert _C.cpu_isa() in isas


def test_set_cpu_isa_switches_and_rejects_bad_names():
    before = _C.cpu_isa()
    try:
        for t in _C.cpu_isas():
            _C.set_cpu_isa(t)
            assert _C.cpu_isa() == t
        with pytest.raises(ValueError, match="name.*unknown CPU ISA tier 'sse9'"):
            _C.set_cpu_isa("sse9")
        missing = [t for t in ("amx", "avx512", "avx2", "neon") if t not in _C.cpu_isas()]
        for t in missing:
            with pytest.raises(ValueError, match=f"cannot run the '{t}' tier"):
                _C.set_cpu_isa(t)
    finally:
        _C.set_cpu_isa(before)
    assert _C.cpu_isa() == before


def test_env_override_is_read_at_load():
    code = "from pykernels import _C; print(_C.cpu_isa())"
    out = _child(code, PYKERNELS_CPU_ISA="portable")
    assert out.returncode == 0 and out.stdout.strip() == "portable", out.stderr[-2000:]
    bad = _child(code, PYKERNELS_CPU_ISA="nonsense")
    assert bad.returncode != 0 and "PYKERNELS_CPU_ISA: unknown CPU ISA tier" in bad.stderr


def test_tier_is_recorded_in_backend_info():
    from pykernels.backends import registry

    b = registry.all_backends()["native"]
    x = {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}
    assert b.describe_call("gemm", x) == {"cpu_isa": _C.cpu_isa()}


def test_cache_sizes_are_sane():
    c = _C.cpu_caches()
    assert 8 * 1024 <= c["l1d"] <= 1024 * 1024
    assert 64 * 1024 <= c["l2"] <= 64 * 1024 * 1024
    assert c["l3"] >= c["l2"] and c["l3_sharing"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiers_agree_with_each_other(dtype):
    """Same inputs on every tier: each within the dtype's tolerance of the others (cheap cross-check)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g).to(dtype)
    b = torch.randn(300, 70, generator=g).to(dtype)
    before = _C.cpu_isa()
    outs = {}
    try:
        for t in _C.cpu_isas():
            _C.set_cpu_isa(t)
            outs[t] = pk.gemm(a, b).double()
    finally:
        _C.set_cpu_isa(before)
    ref = a.double() @ b.double()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for t, o in outs.items():
        assert float((o - ref).abs().max() / ref.abs().max()) < tol, t


@pytest.mark.parametrize("mode", ["on", "off"])
def test_bf16_dot_override_runs_both_bf16_paths(mode):
    """PYKERNELS_BF16_DOT picks vdpbf16ps or widening for the bf16 paths of the avx512 tier (by default a short
    calibration decides, cpu.h bf16_dot_pays): both give the right answer, on whichever CPU (GEMM, attention at
    head dims 64, 96 and 256 and the zero-padded 5, 40, 80 and 99, decode)."""
    if "avx512" not in _C.cpu_isas():
        pytest.skip("this CPU has no avx512 tier")
    code = """
import torch, pykernels as pk
from pykernels import _C
_C.set_cpu_isa("avx512")
f = _C.cpu_features()
assert f["bf16_dot_source"] == "PYKERNELS_BF16_DOT", f
assert f["bf16_dot_used"] == (MODE == "on" and f["avx512_bf16"]), f
g = torch.Generator().manual_seed(0)
for M in (130, 3, 12):  # the packed path, the direct (GEMV-like) one, and that in two passes (zmm at full width)
    a, b = torch.randn(M, 300, generator=g).bfloat16(), torch.randn(300, 70, generator=g).bfloat16()
    ref = a.double() @ b.double()
    assert float((pk.gemm(a, b).double() - ref).abs().max() / ref.abs().max()) < 2e-2, M
    w = b.t().contiguous()  # linear (B stored [N, K]): M = 130 transposes B's panels while packing (widened: pack_t)
    assert float((pk.linear(a, w).double() - ref).abs().max() / ref.abs().max()) < 2e-2, ("linear", M)
from pykernels.harness import verify
from pykernels.kernels import AttentionProblem
for D in (64, 96, 256, 5, 40, 80, 99):  # 96: the P.V in 32-column passes; 5-99: rows padded to 16 (80: a 16-col pass)
    for causal in (False, True):  # 2 x 3 kv heads: more than the packed K/V ring's 4 slots
        prob = AttentionProblem(2, 3, 3, 97, D, causal=causal)
        x = prob.make_inputs(torch.bfloat16)
        exp = verify.expected(prob, x)
        err = exp.assert_close(pk.attention(**x, causal=causal), what=prob.label())
        assert err * exp.reference.abs().max().item() < 3e-2, (causal, err)  # the absolute bound it had before
from pykernels.kernels import DecodeProblem
for paged in (False, True):  # the decode's bf16 q.K: vdpbf16ps pairs or widened rows
    prob = DecodeProblem(2, 8, 2, 300, 64, paged=paged, block_size=16, ragged=True)
    x = prob.make_inputs(torch.bfloat16)
    verify.expected(prob, x).assert_close(pk.decode(**x), what=prob.label())
print("ok")
""".replace("MODE", repr(mode))
    out = _child(code, PYKERNELS_BF16_DOT=mode)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("var, value, message", [
    ("PYKERNELS_BF16_DOT", "sometimes", "PYKERNELS_BF16_DOT: expected on, off or auto"),
    ("PYKERNELS_CPU_PREFETCH", "l3", "PYKERNELS_CPU_PREFETCH: expected l1, l2, l1-ungrouped, l1-grouped or auto"),
    ("PYKERNELS_CPU_PREFETCH_NEAR", "yes", "PYKERNELS_CPU_PREFETCH_NEAR: expected on, off or auto"),
    ("PYKERNELS_CPU_PREFETCH_DISTANCE", "16k", "PYKERNELS_CPU_PREFETCH_DISTANCE: expected bytes, a multiple of 1024"),
    ("PYKERNELS_CPU_PREFETCH_DISTANCE", "1000", "PYKERNELS_CPU_PREFETCH_DISTANCE: expected bytes, a multiple of 1024"),
    ("PYKERNELS_CPU_PREFETCH_DISTANCE", "131072", "PYKERNELS_CPU_PREFETCH_DISTANCE: expected bytes, a multiple of 1024"),
    ("PYKERNELS_CPU_GEMV_STREAMS", "6", "PYKERNELS_CPU_GEMV_STREAMS: expected 4, 8 or auto"),
    ("PYKERNELS_CPU_PAGED_STEP", "48", "PYKERNELS_CPU_PAGED_STEP: expected 16, 32, 64, 128 or auto"),
])
def test_bad_override_fails_the_import(var, value, message):
    bad = _child("import pykernels._C", **{var: value})
    assert bad.returncode != 0 and message in bad.stderr


@pytest.mark.parametrize("level, near, distance", [
    ("l1", "off", 16384), ("l2", "on", 1024), ("l1-ungrouped", "on", 65536), ("l1-ungrouped", "off", 8192),
    ("l1-grouped", "on", 32768),
])
def test_prefetch_override_runs_every_decode_level(level, near, distance):
    """PYKERNELS_CPU_PREFETCH picks where the decode kernels prefetch K/V, PYKERNELS_CPU_PREFETCH_NEAR whether
    they prefetch each line a second time, nearer, PYKERNELS_CPU_PREFETCH_DISTANCE how far ahead (by default the
    CPU or `pykernels tune` decides, cpu.h): every setting gives the right answer on every tier (the shortest
    and longest distances included: the row offsets the loops prefetch from must reach that far), and results
    record it."""
    code = """
import torch, pykernels as pk
from pykernels import _C
from pykernels.backends import registry
from pykernels.harness import verify
from pykernels.kernels import DecodeProblem
f = _C.cpu_features()
assert f["stream_prefetch"] == LEVEL and f["stream_prefetch_source"] == "PYKERNELS_CPU_PREFETCH", f
assert f["stream_prefetch_near"] == WANT_NEAR and f["stream_prefetch_near_source"] == "PYKERNELS_CPU_PREFETCH_NEAR", f
assert f["stream_prefetch_distance"] == DISTANCE, f
for dt in (torch.float32, torch.bfloat16):
    for hkv in (8, 2):  # one query head per kv head (l1-ungrouped: L1) and four (L2)
        for paged in (False, True):
            prob = DecodeProblem(3, 8, hkv, 300, 128, paged=paged, ragged=True)
            x = prob.make_inputs(dt, seed=0)
            exp = verify.expected(prob, x)  # the float64 reference and the dtype-aware tolerance, once
            for tier in _C.cpu_isas():
                _C.set_cpu_isa(tier)
                exp.assert_close(pk.decode(**x, backend="native"), f"{tier} {prob.label()} {dt}")
info = registry.all_backends()["native"].describe_call("decode", x)
assert info["cpu_prefetch"] == LEVEL and info["cpu_prefetch_near"] == WANT_NEAR, info
assert info["cpu_prefetch_distance"] == DISTANCE, info
print("ok")
""".replace("LEVEL", repr(level)).replace("WANT_NEAR", repr(near == "on")).replace("DISTANCE", str(distance))
    out = _child(code, PYKERNELS_CPU_PREFETCH=level, PYKERNELS_CPU_PREFETCH_NEAR=near,
                 PYKERNELS_CPU_PREFETCH_DISTANCE=str(distance))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_set_cpu_prefetch_refuses_bad_levels():
    before = _C.cpu_features()["stream_prefetch"]
    with pytest.raises(ValueError, match="argument 'level'"):
        _C.set_cpu_prefetch("l3")
    assert _C.cpu_features()["stream_prefetch"] == before


def test_set_cpu_prefetch_near_takes_a_bool_only():
    before = _C.cpu_features()["stream_prefetch_near"]
    for bad in (1, "on", None):
        with pytest.raises(TypeError, match="argument 'on'"):
            _C.set_cpu_prefetch_near(bad)
    assert _C.cpu_features()["stream_prefetch_near"] == before
    try:
        _C.set_cpu_prefetch_near(not before)
        f = _C.cpu_features()
        assert f["stream_prefetch_near"] == (not before) and f["stream_prefetch_near_source"] == "set_stream_prefetch_near"
    finally:
        _C.set_cpu_prefetch_near(before)


@pytest.mark.parametrize("rows", ["4", "8"])
def test_gemv_streams_override_gives_the_right_answer_on_every_tier(rows):
    """PYKERNELS_CPU_GEMV_STREAMS picks the rows of B a one-row GEMM reads per step (cpu.h gemv_streams): both
    settings, on every tier, on shapes whose items take the split streams (K a multiple of 64, rows <= 16 KB),
    consecutive rows (rows of 44 KB), and tails (K not a multiple of the rows per step)."""
    code = """
import torch, pykernels as pk
from pykernels import _C
from pykernels.harness import verify
from pykernels.kernels import GemmProblem
assert _C.cpu_features()["gemv_streams"] == ROWS
for dt in (torch.float32, torch.bfloat16):
    for n, k in ((4096, 1024), (11008, 128), (700, 1000), (33, 67), (100, 3)):
        prob = GemmProblem(1, n, k)
        x = prob.make_inputs(dt, seed=0)
        exp = verify.expected(prob, x)
        for tier in _C.cpu_isas():
            _C.set_cpu_isa(tier)
            exp.assert_close(pk.gemm(**x, backend="native"), f"{tier} {prob.label()} {dt}")
print("ok")
""".replace("ROWS", rows)
    out = _child(code, PYKERNELS_CPU_GEMV_STREAMS=rows)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("setter, key, arg, other, bad_types, bad_values, message", [
    ("set_cpu_gemv_streams", "gemv_streams", "rows", lambda v: 12 - v, (4.0, "4", True, None),
     (0, 2, 6, 16, -4, 2**70), "must be 4 or 8"),
    ("set_cpu_paged_step", "paged_step", "tokens", lambda v: 16 if v != 16 else 64, (32.0, "32", True, None),
     (0, 8, 48, 256, -32, 2**70), "must be 16, 32, 64 or 128"),
])
def test_integer_setters_take_their_values_only(setter, key, arg, other, bad_types, bad_values, message):
    """`_C.set_cpu_gemv_streams` / `set_cpu_paged_step`: a TypeError or ValueError naming the argument for anything
    else, the setting and its source unchanged; a good value is set with the given source."""
    set_ = getattr(_C, setter)
    before = _C.cpu_features()
    for bad in bad_types:
        with pytest.raises(TypeError, match=f"argument '{arg}'"):
            set_(bad)
    for bad in bad_values:
        with pytest.raises(ValueError, match=f"argument '{arg}' {message}"):
            set_(bad)
    f = _C.cpu_features()
    assert (f[key], f[key + "_source"]) == (before[key], before[key + "_source"])
    try:
        set_(other(before[key]), source="a test")
        f = _C.cpu_features()
        assert (f[key], f[key + "_source"]) == (other(before[key]), "a test")
    finally:
        set_(before[key], source=before[key + "_source"])


def test_set_cpu_prefetch_distance_refuses_what_is_not_a_distance():
    f0 = _C.cpu_features()
    for bad in (1.5, "16384", True, None):
        with pytest.raises(TypeError, match="argument 'nbytes'"):
            _C.set_cpu_prefetch_distance(bad)
    for bad in (0, -1024, 1000, 512, 128 * 1024, 2**70):
        with pytest.raises(ValueError, match="argument 'nbytes' must be a multiple of 1024 in 1024..65536"):
            _C.set_cpu_prefetch_distance(bad)
    with pytest.raises(TypeError, match="argument 'source'"):
        _C.set_cpu_prefetch_distance(8192, source=3)
    f = _C.cpu_features()
    assert (f["stream_prefetch_distance"], f["stream_prefetch_distance_source"]) == (
        f0["stream_prefetch_distance"], f0["stream_prefetch_distance_source"])
    try:
        _C.set_cpu_prefetch_distance(8192, source="a test")
        f = _C.cpu_features()
        assert (f["stream_prefetch_distance"], f["stream_prefetch_distance_source"]) == (8192, "a test")
        _C.set_cpu_prefetch("l1-grouped", source="another")
        assert _C.cpu_features()["stream_prefetch_source"] == "another"
    finally:
        _C.set_cpu_prefetch_distance(f0["stream_prefetch_distance"], source=f0["stream_prefetch_distance_source"])
        _C.set_cpu_prefetch(f0["stream_prefetch"], source=f0["stream_prefetch_source"])


def test_zmm_fma_width_is_measured_where_avx512():
    from pykernels import _C

    f = _C.cpu_features()
    assert isinstance(f["zmm_fma_full_width"], bool)
    if f["avx512f"] and f["avx2_fma"]:
        assert f["zmm_fma_source"] in ("measured", "default: the probes could not run"), f
    else:
        assert f["zmm_fma_source"] == "no AVX-512" and f["zmm_fma_full_width"] is False, f


def test_isa_tiers_tool_caps_torch_to_the_tier_it_is_compared_with(tmp_path):
    """tools/isa_tiers.py --torch-isa avx2 runs torch on AVX2 (the caps must be set before torch loads:
    the tool does that when run as a program, and refuses when torch is already on another ISA)."""
    if "avx2" not in _C.cpu_isas():
        pytest.skip("this CPU has no AVX2 tier")
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "isa_tiers.py")
    out = tmp_path / "tiers.md"
    r = subprocess.run([sys.executable, tool, "--tiers", "avx2", "--torch-isa", "avx2", "--only", "gemm",
                        "--dtype", "float32", "--rounds", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "torch capped to avx2 (ATEN_CPU_CAPABILITY=avx2" in text and "MKL_ENABLE_INSTRUCTIONS=AVX2" in text
    assert "| gemm M2048-N2048-K2048 | float32 |" in text and "bfloat16" not in text
    if torch.backends.cpu.get_cpu_capability().lower() != "avx2":  # this process's torch is not capped
        import importlib.util

        spec = importlib.util.spec_from_file_location("isa_tiers_tool", tool)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with pytest.raises(SystemExit) as e:
            mod.main(["--torch-isa", "avx2", "--tiers", "avx2", "--out", str(out)])
        assert e.value.code == 2


@pytest.mark.slow
def test_aarch64_tiers_pass_the_cpp_harness_under_qemu():
    """The neon and portable tiers on aarch64: cross-compiled and run under qemu-user by the C++ harness
    (gemm both B layouts, attention, decode against float64). Correctness only: qemu says nothing of speed."""
    import shutil

    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)")
    script = os.path.join(os.path.dirname(__file__), "..", "tools", "cpu_harness", "portable.sh")
    r = subprocess.run(["sh", script], env=dict(os.environ, ARCH="aarch64"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for tier in ("neon", "portable"):
        assert f"tier {tier}: 0 of " in r.stdout, r.stdout[-3000:]


@pytest.mark.slow
def test_x86_tiers_build_and_pass_without_march_native():
    """The extension's PYKERNELS_NATIVE_ARCH=OFF build compiles the AVX-512 / AMX code without -march=native,
    reached through target attributes only (a lambda does not inherit its function's attribute: such a
    build once failed to compile). The C++ harness built that way runs every tier this CPU has."""
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None:
        pytest.skip("needs an x86-64 machine with g++")
    script = os.path.join(os.path.dirname(__file__), "..", "tools", "cpu_harness", "portable.sh")
    r = subprocess.run(["sh", script], env=dict(os.environ, MARCH=""), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for tier in _C.cpu_isas():
        assert f"tier {tier}: 0 of " in r.stdout, r.stdout[-3000:]


def _tls_calls_beside_prefetches(disassembly: str, window: int = 12) -> int:
    """How many `call __tls_get_addr` in `disassembly` (objdump -d) have a software prefetch within the next
    `window` instructions: a thread-local read inside a streaming loop of the extension."""
    lines = [ln for ln in disassembly.splitlines() if "\t" in ln]
    return sum(
        1
        for i, ln in enumerate(lines)
        if "call" in ln and "__tls_get_addr" in ln and any("prefetch" in w for w in lines[i + 1 : i + 1 + window])
    )


def test_tls_scan_finds_a_thread_local_read_beside_a_prefetch():
    """The scan below on the shape it must catch (objdump lines of the AVX2 decode before the fix) and one it
    must not (the read once, well before the loop)."""
    bad_lines = [
        " 14fea4:\tdata16 lea 0xcedba4(%rip),%rdi",
        " 14feac:\tdata16 data16 rex.W call 10280 <__tls_get_addr@plt>",
        " 14feb4:\tcmpb   $0x0,(%rax)",
        " 14fec5:\tprefetcht0 (%rax)",
    ]
    good_lines = (
        [" 10:\tcall 10280 <__tls_get_addr@plt>"]
        + [f" {20 + i:x}:\tvfmadd231ps %ymm1,%ymm2,%ymm3" for i in range(20)]
        + [" 99:\tprefetcht0 (%rax)"]
    )
    bad, good = "\n".join(bad_lines), "\n".join(good_lines)
    assert _tls_calls_beside_prefetches(bad) == 1
    assert _tls_calls_beside_prefetches(good) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared library and objdump: Linux only")
def test_no_thread_local_read_beside_a_prefetch_in_the_extension():
    """In the shared library a thread-local read is a call to __tls_get_addr, around which GCC spills the vector
    registers. One beside every software prefetch of the AVX2 decode's loops cost it ~40% in Python while the
    static C++ harness (plain %fs loads) did not show it (notes/cpu_decode.md); the kernels read such settings
    once per item and pass them down. This scans the built extension for the pattern."""
    import shutil

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert _tls_calls_beside_prefetches(out.stdout) == 0
