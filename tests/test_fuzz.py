"""Property-based tests (hypothesis) of the public API and of the result-file readers.

- a valid call (random shapes around the block sizes, dtypes, scales, causal, ragged context lengths, paged
  block tables) matches the float64 reference;
- an invalid call (one argument spoiled: dtype, rank, stride, size, value) raises ValueError/TypeError that
  names the argument; nothing crashes;
- `pykernels report|compare|tokens|plot` on a truncated, malformed or hostile file: one line and exit 2.

Budget: the profile `pykernels-ci` (default; a few seconds per test) or `pykernels-long`
(`PYKERNELS_FUZZ=long pytest tests/test_fuzz.py`, or `--hypothesis-profile pykernels-long`); both are
registered in tests/conftest.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pykernels as pk
from pykernels import cli
from pykernels.harness import results, verify
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

BACKENDS = ["native", "torch_ops", "numpy", "torch"]
DTYPES = [torch.float32, torch.bfloat16]
SCALES = st.one_of(st.none(), st.floats(0.01, 3.0), st.floats(-3.0, -0.01))
FN = {"gemm": pk.gemm, "attention": pk.attention, "decode": pk.decode}
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)


def _supported(backend: str, problem, dtype) -> bool:
    from pykernels.backends import registry

    b = registry.all_backends().get(backend)
    return b is not None and registry.info(b).available and \
        b.supports(problem.family, "cpu", dtype, **problem.params()) is None


@st.composite
def problems(draw):
    family = draw(st.sampled_from(["gemm", "attention", "decode"]))
    if family == "gemm":
        return GemmProblem(M=draw(st.integers(1, 70)), N=draw(st.integers(1, 70)), K=draw(st.integers(1, 140)))
    hkv, group = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4]))
    D = draw(st.sampled_from([64, 128, 96, 40, 256]))  # native CPU: the tiers' attention at 96 / 256, portable at 40
    if family == "attention":
        return AttentionProblem(B=draw(st.integers(1, 2)), Hq=hkv * group, Hkv=hkv, S=draw(st.integers(1, 70)), D=D,
                                causal=draw(st.booleans()), scale=draw(SCALES))
    return DecodeProblem(B=draw(st.integers(1, 4)), Hq=hkv * group, Hkv=hkv, context=draw(st.integers(1, 90)), D=D,
                         paged=draw(st.booleans()), block_size=draw(st.integers(1, 40)), ragged=draw(st.booleans()),
                         scale=draw(SCALES))


@FUZZ
@given(problem=problems(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**16))
def test_a_valid_call_matches_the_float64_reference(problem, dtype, backend, seed):
    assume(_supported(backend, problem, dtype))
    # torch 2.13's CPU SDPA gives NaN for causal attention with a negative scale (a strict xfail in test_robust.py)
    assume(not (backend == "torch" and problem.family == "attention" and problem.causal and (problem.scale or 1) < 0))
    inputs = problem.make_inputs(dtype, seed=seed)
    exp = verify.expected(problem, inputs)
    out = FN[problem.family](**inputs, **problem.call_kwargs(), backend=backend)
    assert out.dtype == dtype and out.shape == exp.reference.shape
    exp.assert_close(out, what=f"{backend} {problem.label()} {dtype}")


# ---------------------------------------------------------------------------------------------------
# invalid calls: one argument spoiled, the error names it

def _spoilers(family: str, inputs: dict, kw: dict):
    """(argument name, description, spoiled kwargs) for every way to spoil one argument."""
    tensors = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]
    for n in tensors:
        t = inputs[n]
        is_index = t.dtype == torch.int32
        yield n, "float64", {n: t.to(torch.float64)}
        if not is_index:
            yield n, "int64", {n: t.to(torch.int64)}
        yield n, "rank+1", {n: t.unsqueeze(0)}
        if t.dim() > 1:
            yield n, "flattened", {n: t.reshape(-1)}
        yield n, "list", {n: t.tolist()}
        if n != "block_table":  # None is the contiguous layout: valid or an error about k_cache
            yield n, "None", {n: None}
        yield n, "empty", {n: t.narrow(-1, 0, 0)}
        if t.dim() >= 2 and t.shape[-1] > 1:
            yield n, "strided", {n: t[..., ::2]}
        if t.dim() >= 1 and t.shape[-1] > 1 and not is_index and n != "b":  # a narrower b is a valid GEMM
            yield n, "last dim -1", {n: t[..., :-1].contiguous()}
    if "scale" in kw or family != "gemm":
        for bad in (0.0, math.nan, math.inf, -math.inf, "0.5", True, [1.0]):
            yield "scale", f"scale={bad!r}", {"scale": bad}
    if family == "attention":
        yield "causal", "causal=1", {"causal": 1}
        yield "causal", "causal='yes'", {"causal": "yes"}
    if family == "decode":
        lens = inputs["context_lens"]
        for v in (0, -1, 10**6):
            bad = lens.clone()
            bad[-1] = v
            yield "context_lens", f"context_lens={v}", {"context_lens": bad}
        yield "context_lens", "B+1 entries", {"context_lens": torch.cat([lens, lens[:1]])}
        bt = inputs["block_table"]
        if bt is not None:
            for v in (-1, inputs["k_cache"].shape[0], 2**31 - 1):
                bad = bt.clone()
                bad[0, 0] = v
                yield "block_table", f"block_table={v}", {"block_table": bad}
    yield "backend", "unknown backend", {"backend": "no_such_backend"}


@FUZZ
@given(problem=problems(), dtype=st.sampled_from(DTYPES), data=st.data())
def test_an_invalid_call_raises_an_error_naming_the_argument(problem, dtype, data):
    inputs = problem.make_inputs(dtype, seed=1)
    kw = problem.call_kwargs()
    spoilers = list(_spoilers(problem.family, inputs, kw))
    name, what, change = data.draw(st.sampled_from(spoilers), label="spoiler")
    call = {**inputs, **kw, "backend": "native", **change}
    with pytest.raises((ValueError, TypeError)) as e:
        FN[problem.family](**call)
    assert f"'{name}'" in str(e.value), f"{what}: the message does not name '{name}': {e.value}"


# ---------------------------------------------------------------------------------------------------
# the result-file readers


def _record(backend: str, tier: str, median: float) -> dict:
    stats = {"median_s": median, "p20_s": median * 0.95, "p80_s": median * 1.05, "cv": 0.02, "rounds": 20,
             "samples": []}
    return results.make_record(problem=GemmProblem(M=64, N=64, K=64), backend_name=backend, tier=tier, device="cpu",
                               device_name="cpu: fuzz", machine_id="fuzz", dtype="float32", stats=stats,
                               max_error=1e-7, tolerance=1e-5, ok=True, peak_flops=1e11, peak_bw=1e10,
                               sweep="smoke")


def _valid_doc() -> dict:
    return {"machine_info": {}, "benchmarks": [
        {"name": f"bench_gemm[{b}]", "extra_info": _record(b, t, m)}
        for b, t, m in (("native", "native", 1e-4), ("torch", "vendor", 1.2e-4))]}


JSONS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)


@st.composite
def hostile_files(draw):
    """(suffix, bytes) of a result file that is truncated, malformed or hostile."""
    text = json.dumps(_valid_doc())
    kind = draw(st.sampled_from(["truncated", "any json", "field", "benchmark", "deep", "bytes", "journal"]))
    if kind == "truncated":
        return ".json", text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "any json":
        return ".json", json.dumps(draw(JSONS)).encode()
    if kind == "field":  # one field of one record replaced by anything
        doc = _valid_doc()
        ex = doc["benchmarks"][draw(st.integers(0, 1))]["extra_info"]
        ex[draw(st.sampled_from(sorted(ex)))] = draw(JSONS)
        return ".json", json.dumps(doc).encode()
    if kind == "benchmark":
        doc = _valid_doc()
        doc[draw(st.sampled_from(["benchmarks", "machine_info", "pykernels_failed"]))] = draw(JSONS)
        return ".json", json.dumps(doc).encode()
    if kind == "deep":
        n = draw(st.sampled_from([50, 5000, 200000]))
        return ".json", ("[" * n + "]" * n).encode()
    if kind == "bytes":
        return ".json", draw(st.binary(max_size=64))
    lines = [json.dumps({"schema": results.JOURNAL_SCHEMA, "key": "gemm/x", "status": "measured",
                         "extra_info": _record("native", "native", 1e-4)})]
    lines.append(json.dumps(draw(JSONS)))
    lines.append(lines[0][: draw(st.integers(0, len(lines[0])))])
    order = draw(st.permutations(lines))
    return ".jsonl", "\n".join(order).encode()


def _run(capsys, argv) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("command", ["report", "compare", "tokens", "plot"])
@FUZZ
@given(f=hostile_files())
def test_a_bad_result_file_gives_one_line_and_exit_2(command, f, tmp_path_factory, capsys):
    d = tmp_path_factory.mktemp("fuzz")
    suffix, data = f
    bad = d / f"bad{suffix}"
    bad.write_bytes(data)
    good = d / "good.json"
    good.write_text(json.dumps(_valid_doc()))
    argv = {"report": ["report", str(bad)], "compare": ["compare", str(good), str(bad)],
            "tokens": ["tokens", str(bad), "--model", "tiny"], "plot": ["plot", str(bad), "--out", str(d / "p")]}[command]
    if command == "plot":
        pytest.importorskip("matplotlib")
    code, err = _run(capsys, argv)
    assert code in (0, 1, 2), (code, err)  # 0/1: the file happened to be usable (tokens: 1 = nothing complete)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pykernels {command}: "), err
    assert "Traceback" not in err


def test_the_valid_base_document_is_accepted(tmp_path, capsys):
    p = tmp_path / "good.json"
    p.write_text(json.dumps(_valid_doc()))
    assert _run(capsys, ["report", str(p)])[0] == 0
