"""Fixed costs (issue 21) and the backend protocol's `prepare` hook (issue 18): the hook is used and its cost
recorded, the default path is unchanged, native prepared calls are correct at small shapes, and the public
API's cache of validated signatures never lets bad input through. No timing is asserted here."""

from __future__ import annotations

import json
import time

import pytest
import torch

import pykernels as pk
from pykernels import ops
from pykernels.backends import Backend, registry
from pykernels.backends.torch_ops import TorchBackend
from pykernels.harness import sweeps, verify
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

SMALL = sweeps.sweep("small")


def _native_ok():
    return registry.info(registry.all_backends()["native"]).available


needs_native = pytest.mark.skipif(not _native_ok(), reason="the native extension is not built")


class PreparingBackend(TorchBackend):
    """torch's kernels behind a prepare hook that does one-off work and counts what is called."""

    name = "test_preparing"
    tier = "abstraction"
    PREPARE_SLEEP_S = 0.03

    def __init__(self):
        self.prepared, self.family_calls = [], 0

    def prepare(self, family, **kw):
        time.sleep(self.PREPARE_SLEEP_S)  # stands in for a compile: must show in prepare_s, never in the timing
        self.prepared.append((family, sorted(kw)))
        out = {"gemm": lambda: kw["a"] @ kw["b"]}.get(family)
        return out if out is not None else super().prepare(family, **kw)

    def gemm(self, a, b):
        self.family_calls += 1
        return super().gemm(a, b)


@pytest.fixture
def preparing():
    b = PreparingBackend()
    registry.register(b, source="test")
    try:
        yield b
    finally:
        registry.unregister(b.name)


# ---------------------------------------------------------------------------------------------------
# the prepare hook


def test_overriding_prepare_is_what_pk_prepare_returns(preparing):
    x = GemmProblem(5, 6, 7).make_inputs(torch.float32)
    fn = pk.prepare("gemm", backend="test_preparing", **x)
    assert preparing.prepared == [("gemm", ["a", "b"])]
    out = fn()
    assert preparing.family_calls == 0  # the prepared callable, not the family method
    torch.testing.assert_close(out, x["a"] @ x["b"])
    pk.gemm(**x, backend="test_preparing")  # the public call uses the family method
    assert preparing.family_calls == 1


def test_prepare_receives_the_validated_arguments(preparing):
    att = AttentionProblem(1, 4, 2, 9, 64).make_inputs(torch.float32)
    pk.prepare("attention", backend="test_preparing", **att, causal=True)
    dec = DecodeProblem(2, 4, 2, 20, 64).make_inputs(torch.float32)
    pk.prepare("decode", backend="test_preparing", **dec)
    assert preparing.prepared == [("attention", ["causal", "k", "q", "scale", "v"]),
                                  ("decode", ["block_table", "context_lens", "k_cache", "q", "scale", "v_cache"])]


def test_prepare_must_return_a_callable(preparing, monkeypatch):
    monkeypatch.setattr(preparing, "prepare", lambda family, **kw: 42)
    x = GemmProblem(5, 6, 7).make_inputs(torch.float32)
    with pytest.raises(TypeError, match="test_preparing.*not a callable"):
        pk.prepare("gemm", backend="test_preparing", **x)


def test_bad_input_is_rejected_before_prepare(preparing):
    with pytest.raises(ValueError, match="'b'"):
        pk.prepare("gemm", backend="test_preparing", a=torch.randn(5, 6), b=torch.randn(7, 6))
    assert preparing.prepared == []


def test_measure_case_records_prepare_s(preparing, tmp_path, monkeypatch):
    from pykernels.harness import device
    from pykernels.harness.measure import measure_case

    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    fp = device.fingerprint("cpu")
    (tmp_path / f"peaks-cpu-{fp['id']}.json").write_text(json.dumps({
        "version": device.PEAKS_VERSION, "bandwidth": {"bytes_per_s": 1e10},
        "flops": {"float32": {"flops_per_s": 1e11}}}))
    prob = GemmProblem(M=9, N=17, K=33)
    r = measure_case(prob, torch.float32, "test_preparing", "cpu", inputs=prob.make_inputs(torch.float32),
                     budget_s=0.05)
    assert r["prepare_s"] >= PreparingBackend.PREPARE_SLEEP_S
    assert len(preparing.prepared) == 1 and preparing.family_calls == 0  # once, outside the timed calls


class Plain(Backend):
    name = "test_plain"
    tier = "abstraction"
    devices = ("cpu",)
    dtypes = {("cpu", f): (torch.float32,) for f in ("gemm", "attention", "decode")}

    def gemm(self, a, b):
        return a @ b

    def attention(self, q, k, v, *, causal, scale):
        return pk.attention(q, k, v, causal=causal, scale=scale, backend="torch")

    def decode(self, q, k_cache, v_cache, context_lens, block_table, *, scale):
        return pk.decode(q, k_cache, v_cache, context_lens, block_table=block_table, scale=scale, backend="torch")


@pytest.mark.parametrize("problem", [GemmProblem(3, 5, 7), AttentionProblem(1, 4, 2, 9, 64, causal=True),
                                     DecodeProblem(2, 4, 2, 20, 64, paged=True, block_size=8, ragged=True)],
                         ids=lambda p: p.family)
def test_default_prepare_calls_the_family_method(problem):
    """A backend without a prepare hook (the built-ins but native on CPU, the example plugin) is timed
    through its family method, as before the hook existed: a fresh output per call."""
    b = Plain()
    registry.register(b, source="test")
    try:
        inputs = problem.make_inputs(torch.float32)
        fn = pk.prepare(problem.family, backend="test_plain", **inputs, **problem.call_kwargs())
        o1, o2 = fn(), fn()
        assert o1 is not o2
        verify.expected(problem, inputs).assert_close(o1)
    finally:
        registry.unregister(b.name)


def test_example_plugin_keeps_working():
    if "example_torch" not in registry.all_backends():
        pytest.skip("the example plugin is not installed (pip install ./examples/example_plugin)")
    prob = DecodeProblem(2, 4, 2, 20, 64, paged=True, block_size=8)
    inputs = prob.make_inputs(torch.float32)
    out = pk.prepare("decode", backend="example_torch", **inputs)()
    verify.expected(prob, inputs).assert_close(out)


# ---------------------------------------------------------------------------------------------------
# native prepared calls


@needs_native
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.id())
def test_native_small_shapes_correct(case):
    """Every case of the small sweep, prepared and through the public API, against the float64 reference."""
    dt = getattr(torch, case.dtype)
    inputs = case.problem.make_inputs(dt, seed=1)
    exp = verify.expected(case.problem, inputs)
    fn = pk.prepare(case.family, backend="native", **inputs, **case.problem.call_kwargs())
    exp.assert_close(fn(), "prepared")
    exp.assert_close(fn(), "prepared, second call")
    exp.assert_close(getattr(pk, case.family)(**inputs, **case.problem.call_kwargs(), backend="native"), "public")


@needs_native
@pytest.mark.parametrize("n", [1, 7, 16, 63, 64, 65, 127, 128, 129])
def test_native_gemm_around_the_serial_threshold(n):
    """Odd sizes around the single-thread crossover and the block sizes, prepared."""
    prob = GemmProblem(n, n + 3, n)
    inputs = prob.make_inputs(torch.float32, seed=2)
    verify.expected(prob, inputs).assert_close(pk.prepare("gemm", backend="native", **inputs)())


@needs_native
def test_native_prepared_output_is_reused_and_follows_the_inputs():
    prob = GemmProblem(16, 16, 16)
    x = prob.make_inputs(torch.float32)
    fn = pk.prepare("gemm", backend="native", **x)
    o1 = fn()
    assert fn() is o1  # allocated once, at prepare time
    x["a"].mul_(2)  # computed from the tensors given to prepare: in-place changes are seen
    torch.testing.assert_close(fn(), (x["a"].double() @ x["b"].double()).float(), rtol=1e-5, atol=1e-5)
    fresh = pk.prepare("gemm", backend="native", **x)()
    assert fresh is not o1  # a new prepare, a new output


@needs_native
def test_native_prepared_decode_checks_metadata_on_every_call():
    """context_lens / block_table are host memory a caller may change after prepare: checked per call."""
    prob = DecodeProblem(2, 4, 2, 20, 64, paged=True, block_size=8)
    x = prob.make_inputs(torch.float32)
    fn = pk.prepare("decode", backend="native", **x)
    fn()
    x["context_lens"][1] = 10_000
    with pytest.raises(ValueError, match="context_lens"):
        fn()
    x["context_lens"][1] = 20
    x["block_table"][0, 0] = -5
    with pytest.raises(ValueError, match="block_table"):
        fn()


@needs_native
def test_native_prepared_keeps_its_operands_alive():
    prob = GemmProblem(33, 40, 50)
    x = prob.make_inputs(torch.float32)
    ref = (x["a"].double() @ x["b"].double()).float()
    fn = pk.prepare("gemm", backend="native", a=x.pop("a"), b=x.pop("b"))
    import gc

    gc.collect()
    torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the public API's cache of validated signatures


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cached_signature_does_not_hide_errors(backend):
    x = GemmProblem(5, 6, 7).make_inputs(torch.float32)
    pk.gemm(**x, backend=backend)  # this signature is now cached
    with pytest.raises(ValueError, match="'b'.*contiguous"):  # same shape, other strides
        pk.gemm(x["a"], torch.randn(7, 6).t(), backend=backend)
    with pytest.raises(TypeError, match="'b'"):
        pk.gemm(x["a"], x["b"].bfloat16(), backend=backend)
    with pytest.raises(ValueError, match="'b'"):
        pk.gemm(x["a"], x["b"].to("meta"), backend=backend)
    a = AttentionProblem(1, 4, 2, 9, 64).make_inputs(torch.float32)
    pk.attention(**a, causal=True, scale=0.5, backend=backend)
    with pytest.raises(TypeError, match="'causal'"):  # 1 == True: the key must tell them apart
        pk.attention(**a, causal=1, scale=0.5, backend=backend)
    pk.attention(**a, scale=1.0, backend=backend)
    with pytest.raises(TypeError, match="'scale'"):  # True == 1.0
        pk.attention(**a, scale=True, backend=backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cached_linear_signature_does_not_hide_errors(backend):
    x, w = torch.randn(5, 7), torch.randn(6, 7)
    torch.testing.assert_close(pk.linear(x, w, backend=backend), x @ w.t(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'w'.*contiguous"):  # same shape, other strides
        pk.linear(x, torch.randn(7, 6).t(), backend=backend)
    with pytest.raises(TypeError, match="'w'"):
        pk.linear(x, w.bfloat16(), backend=backend)
    torch.testing.assert_close(pk.linear(x, w, backend=backend), x @ w.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cached_decode_signature_still_checks_contents(backend):
    d = DecodeProblem(2, 4, 2, 20, 64, paged=True, block_size=8).make_inputs(torch.float32)
    pk.decode(**d, backend=backend)
    bad = d["context_lens"].clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="'context_lens'"):
        pk.decode(**dict(d, context_lens=bad), backend=backend)
    bt = d["block_table"].clone()
    bt[1, 0] = 999
    with pytest.raises(ValueError, match="'block_table'"):
        pk.decode(**dict(d, block_table=bt), backend=backend)


def test_registry_changes_clear_the_cache(preparing):
    x = GemmProblem(5, 6, 7).make_inputs(torch.float32)
    pk.gemm(**x, backend="test_preparing")
    assert preparing.family_calls == 1
    other = PreparingBackend()
    registry.register(other, source="test", replace=True)
    pk.gemm(**x, backend="test_preparing")
    assert (preparing.family_calls, other.family_calls) == (1, 1)
    registry.unregister("test_preparing")
    with pytest.raises(ValueError, match="unknown backend"):
        pk.gemm(**x, backend="test_preparing")
    registry.register(preparing, source="test")  # for the fixture's teardown


def test_cache_is_bounded():
    x = GemmProblem(2, 3, 4).make_inputs(torch.float32)
    for m in range(1, 40):
        pk.gemm(torch.randn(m, 4), x["b"], backend="torch")
    assert 0 < len(ops._validated) <= ops._VALIDATED_MAX


# ---------------------------------------------------------------------------------------------------
# the sweeps and the tool


def test_small_sweep_shapes():
    labels = {(c.family, c.problem.label()) for c in SMALL}
    for n in (16, 32, 64, 128):
        assert ("gemm", f"M{n}-N{n}-K{n}") in labels
    assert {c.problem.S for c in SMALL if c.family == "attention"} == {16, 32, 64, 128}
    assert {c.problem.context for c in SMALL if c.family == "decode"} == {16, 32, 64, 128}
    quick = {(c.problem, c.dtype) for c in sweeps.sweep("quick")}
    assert {(c.problem, c.dtype) for c in SMALL if c.dtype == "float32"} <= quick


def _tool(name: str):
    """tools/<name>.py loaded as a module (tools/ is not a package); skips where the checkout has no tools/."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    if not path.exists():
        pytest.skip("tools/ is not part of this checkout")
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_overhead_tool_renders(tmp_path):
    """tools/overhead.py end to end on one family with a tiny budget (its numbers are not checked)."""
    tool = _tool("overhead")
    if not _native_ok():
        pytest.skip("the native extension is not built")
    assert tool.main(["--budget", "0.01", "--kernel", "decode", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o.md").read_text()
    assert "B1-Hq32-Hkv8-L16-D128" in md and "pk.gemm − prepared" in md and "CPU:" in md
    doc = json.loads((tmp_path / "o.json").read_text())
    assert len(doc["rows"]) == 8 and all(r["native_vs_torch_rel_diff"] < 0.05 for r in doc["rows"])


@needs_native
def test_prepared_bindings_check_their_arguments():
    from pykernels import _C

    a = torch.randn(4, 4)
    p = a.data_ptr()
    with pytest.raises(ValueError, match="'a' is a null pointer"):
        _C.prepare_gemm(0, p, p, 4, 4, 4, 0, out=a, keep=())
    with pytest.raises(ValueError, match="'K' must be >= 1"):
        _C.prepare_gemm(p, p, p, 4, 4, 0, 0, out=a, keep=())
    with pytest.raises(ValueError, match="'dtype'"):
        _C.prepare_gemm(p, p, p, 4, 4, 4, 9, out=a, keep=())
    t = torch.randn(1, 4, 8, 64)
    with pytest.raises(ValueError, match="'Hq'"):
        _C.prepare_attention(t.data_ptr(), t.data_ptr(), t.data_ptr(), t.data_ptr(), 1, 4, 3, 8, 64, 0.1, False, 0,
                             out=t, keep=())
    q, kc = torch.randn(1, 4, 64), torch.randn(1, 2, 16, 64)
    lens = torch.tensor([17], dtype=torch.int32)  # capacity is 16
    with pytest.raises(ValueError, match="context_lens"):
        _C.prepare_decode(q.data_ptr(), kc.data_ptr(), kc.data_ptr(), q.data_ptr(), lens.data_ptr(), 0, 1, 4, 2, 64,
                          1, 16, 1, 0.1, 0, out=q, keep=())


def test_issue6_compares_only_large_rows_with_the_bandwidth_probes():
    """tools/issue6.py interleaves 256 MiB copy / read probes with the rows it calls memory-bound: a cache-sized
    decode or GEMM 16^3 among them was timed cold and judged against DRAM bandwidth (a 0.3 us call read as 10 us)."""
    tool = _tool("issue6")
    bound = {(c.family, c.problem.label(), c.dtype): tool.memory_bound(c) for c in sweeps.sweep("quick")}
    assert bound[("gemm", "M1-N4096-K4096", "float32")] and bound[("gemm", "M16-N4096-K4096", "bfloat16")]
    assert bound[("decode", "B8-Hq32-Hkv8-L4096-D128-paged16", "bfloat16")]
    assert not bound[("gemm", "M16-N16-K16", "float32")]
    assert not bound[("decode", "B1-Hq32-Hkv8-L128-D128-contig", "float32")]
    assert not any(b for (fam, _, _), b in bound.items() if fam == "attention")


def test_issue6_streams_memory_bound_rows_and_reads_with_the_native_probe(tmp_path, monkeypatch):
    """tools/issue6.py end to end on one small decode case made memory-bound: its KV cache rotates through
    copies (native and torch alike), and the read column is the native STREAM-style read (_C.ReadPass) of the
    same rounds, not torch's one-stream `src.sum()` (25% slower on the Sapphire Rapids VM, which put decode
    rows at 100-116% of "read")."""
    tool = _tool("issue6")
    if not _native_ok():
        pytest.skip("the native extension is not built")
    case = sweeps.sweep("shapes:B=2,Hq=8,Hkv=2,L=1024,D=64,paged=1,block_size=16", dtypes=("bfloat16",))[0]
    monkeypatch.setattr(tool.sweeps, "sweep", lambda name: [case])
    monkeypatch.setattr(tool, "MEMORY_BOUND_MIN_BYTES", 0)
    monkeypatch.setattr(tool.timing, "cpu_llc_bytes", lambda: case.problem.bytes(torch.float32))
    monkeypatch.setattr(tool, "bandwidth", lambda: {"copy_bytes_per_s": 1e10})
    real = tool._C.ReadPass
    monkeypatch.setattr(tool._C, "ReadPass", lambda: real(1 << 20, None))
    assert tool.main(["--budget", "0.02", "--out", str(tmp_path / "i6")]) == 0
    doc = json.loads((tmp_path / "i6.json").read_text())
    (row,) = doc["rows"]
    assert row["memory_bound"] and row["input_copies"] >= 2 and doc["read_probe"]["nbytes"] == 1 << 20
    assert row["read_bytes_per_s"] > 0 and row["pct_read_bw"] > 0
    assert row["native_vs_torch_rel_error"] < 0.05
    assert "`_C.ReadPass`" in (tmp_path / "i6.md").read_text()


def test_issue6_times_the_peak_probe_in_the_rounds_of_peak_target_rows(tmp_path, monkeypatch):
    """tools/issue6.py: a row with an issue-21 peak target (here a small GEMM made one) also times the dtype's
    peak probe loop (_C.ComputePass, the cached peak's kind) in its rounds and reports the kernel's share of it,
    median over rounds of the per-round ratio, beside the share of the cached peak."""
    tool = _tool("issue6")
    if not _native_ok():
        pytest.skip("the native extension is not built")
    case = sweeps.sweep("shapes:M=96,N=96,K=96", dtypes=("float32",))[0]
    assert case.family == "gemm"
    monkeypatch.setattr(tool.sweeps, "sweep", lambda name: [case])
    monkeypatch.setattr(tool, "target21", lambda family, dtype, params: ("peak", 0.85))
    monkeypatch.setattr(tool, "bandwidth", lambda: {"copy_bytes_per_s": 1e10})
    real_read = tool._C.ReadPass
    monkeypatch.setattr(tool._C, "ReadPass", lambda: real_read(1 << 20, None))
    made = []
    real = tool._C.ComputePass
    monkeypatch.setattr(tool._C, "ComputePass", lambda *a: made.append(real(*a)) or made[-1])
    assert tool.main(["--budget", "0.05", "--out", str(tmp_path / "i6")]) == 0
    doc = json.loads((tmp_path / "i6.json").read_text())
    (row,) = doc["rows"]
    peak = doc["peaks_flops"]["float32"]
    if peak.get("kind") not in tool._C.probe_kinds()["compute"]:
        assert "pct_peak_rounds" not in row and not made
        return
    assert [m.kind for m in made] == [peak["kind"]] and row["probe_rounds"]["kind"] == peak["kind"]
    assert row["probe_rounds"]["flop"] == made[0].flop > 0 and row["probe_rounds"]["rounds"] == row["native"]["rounds"]
    rate = row["flops"] / row["native"]["median_s"]
    probe = made[0].flop / row["probe_rounds"]["median_s"]
    assert 0 < row["pct_peak_rounds"] and 0.5 < row["pct_peak_rounds"] / (100 * rate / probe) < 2
    md = (tmp_path / "i6.md").read_text()
    assert "% of the peak probe of the same rounds" in md and "`_C.ComputePass`" in md

