"""The pytest plugin, run in a subprocess on a throwaway project (pytester): smoke vs --benchmark, what
lands in the JSON and the journal, --resume after a killed run, autosave + compare, wrong answers,
skips with reasons, option errors."""

from __future__ import annotations

import json
import re

import pytest

from pykernels.harness import device

pytest_plugins = ["pytester"]

BENCH = '''
import pytest

@pytest.mark.pykernels_bench("gemm")
def test_gemm(kernel_case, kernel_bench):
    kernel_bench(kernel_case)

def test_plain():
    pass
'''

CONFTEST = '''
import torch
from pykernels.backends import Backend, register

class FastWrong(Backend):
    """Fast and wrong: zeros."""
    name = "fast_wrong"
    tier = "abstraction"
    devices = ("cpu",)
    dtypes = {("cpu", "gemm"): (torch.float32,)}

    def gemm(self, a, b):
        return torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)


def pytest_configure(config):
    register(FastWrong(), replace=True)


def pytest_unconfigure(config):
    from pykernels.backends import registry
    registry.unregister("fast_wrong")
'''

# The smoke sweep's float32 gemm shapes; each backend gets one case per shape.
SMOKE_GEMM_F32 = 2


@pytest.fixture
def project(pytester, monkeypatch):
    """A project with one gemm bench function, a fake-wrong backend and a pre-filled peaks cache (so no probe runs)."""
    cache = pytester.path / "cache"
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(cache))
    fp = device.fingerprint("cpu")
    cache.mkdir()
    (cache / f"peaks-cpu-{fp['id']}.json").write_text(json.dumps({
        "version": device.PEAKS_VERSION, "bandwidth": {"bytes_per_s": 1e12},
        "flops": {dt: {"flops_per_s": 4e11, "n": 2048} for dt in ("float32", "bfloat16", "float16")}}))
    pytester.makepyfile(test_bench=BENCH)
    pytester.makeconftest(CONFTEST)
    return pytester


def run(p, *args):
    # in-process: torch is imported once (a subprocess costs seconds per run on a busy 2-core machine)
    # (--benchmark-json is not used in-process: it is an argparse.FileType, and pytest parses the command line
    # more than once, leaving unclosed file objects behind; the JSON is read from --benchmark-storage instead.)
    return p.runpytest_inprocess("-p", "pykernels.pytest_plugin", "-p", "no:cacheprovider", *args)


def saved(p, name: str) -> dict:
    """The JSON pytest-benchmark saved in the project's storage under a name ending in `name`."""
    (path,) = p.path.glob(f"store/*/*{name}.json")
    return json.loads(path.read_text())


TIMED = ("--pk-bench", "--pk-sweep", "smoke", "--pk-kernel", "gemm", "--pk-dtype", "float32", "--pk-time-budget", "0.02")


def test_plain_pytest_runs_each_case_once_untimed(project):
    r = run(project, "--pk-backend", "native", "--pk-backend", "torch", "--pk-kernel", "gemm", "--pk-dtype", "fp32")
    r.assert_outcomes(passed=2 * SMOKE_GEMM_F32 + 1)
    assert "pykernels speedup table" not in r.stdout.str() and "pykernels [" not in r.stdout.str()
    assert not list(project.path.glob("cache/journal-*"))  # nothing timed, nothing journaled


def test_benchmark_json_extra_info_machine_info_and_journal(project):
    r = run(project, *TIMED, "--pk-backend", "torch", "--pk-backend", "numpy", "--benchmark-storage", "file://store",
            "--benchmark-save", "out", "--pk-journal", "j.jsonl")
    r.assert_outcomes(passed=2 * SMOKE_GEMM_F32, deselected=1)  # --pk-bench runs only the bench cases
    out = r.stdout.str()
    assert "pykernels speedup table" in out and "| backend |" not in out  # terminal tables, not Markdown
    assert "geometric mean over shapes" in out
    # live progress, one plain line per case (not a terminal here): which case, how many, elapsed, time left
    assert re.search(r"pykernels \[1/4\] gemm float32 M\d+-N\d+-K\d+ torch  \(0:\d\d elapsed, ~\? left\)", out)
    assert "pykernels [4/4] gemm float32" in out and "left)" in out
    assert "Name (time in" not in out  # pytest-benchmark's duplicate table is hidden ...
    assert "measured peaks: bandwidth 1 TB/s" in out and "bandwidth probe of this run: copy" in out
    doc = saved(project, "out")
    assert len(doc["benchmarks"]) == 2 * SMOKE_GEMM_F32
    b = doc["benchmarks"][0]
    ex = b["extra_info"]
    for k in ("family", "backend", "tier", "device", "dtype", "params", "flops", "bytes", "median_s", "p20_s", "p80_s",
              "cv", "rounds", "tflops", "gbps", "pct_roofline", "max_error", "ok"):
        assert k in ex, k
    assert ex["ok"] is True and ex["peak_bw"] == 1e12 and ex["checked"] == "full+fresh" and ex["recheck_ok"] is True
    assert ex["copy_bytes_per_s_this_run"] > 1e8 and ex["read_bytes_per_s_this_run"] > 1e8
    assert 0 < ex["prepare_s"] < 60  # the one-off cost of pk.prepare, recorded beside the result
    assert b["stats"]["rounds"] == ex["rounds"]  # pytest-benchmark got our timer's samples
    assert b["stats"]["median"] == pytest.approx(ex["median_s"])
    assert b["group"].startswith("gemm float32 ")
    mi = doc["machine_info"]["pykernels"]
    assert mi["device"]["type"] == "cpu" and mi["peaks"]["bandwidth"]["bytes_per_s"] == 1e12
    assert ex["sweep"] == "smoke"
    lines = [json.loads(x) for x in (project.path / "j.jsonl").read_text().splitlines()]
    # each case: a "started" marker, then its result
    assert [e["status"] for e in lines] == ["started", "measured"] * (2 * SMOKE_GEMM_F32)
    # ... unless asked for; -v gives pytest's own per-test lines instead of the progress
    r = run(project, *TIMED, "--pk-backend", "numpy", "--pk-benchmark-table", "-v", "--pk-journal", "j2.jsonl")
    out = r.stdout.str()
    assert "Name (time in" in out and "pykernels [" not in out and "PASSED" in out


def test_resume_after_a_killed_run_and_compare(project):
    args = (*TIMED, "--pk-backend", "torch", "--pk-journal", "j.jsonl", "--benchmark-storage", "file://store")
    run(project, *args, "--benchmark-autosave").assert_outcomes(passed=SMOKE_GEMM_F32, deselected=1)
    j = project.path / "j.jsonl"
    first = j.read_text().splitlines()  # started, measured, started, measured
    # as if killed while writing the second case's result: its "started" line, then a torn one
    j.write_text("\n".join(first[:3]) + "\n" + first[3][: len(first[3]) // 2])
    r = run(project, *args, "--pk-resume", "--benchmark-save", "resumed", "--benchmark-compare")
    r.assert_outcomes(passed=SMOKE_GEMM_F32, deselected=1)
    doc = saved(project, "resumed")
    resumed = [b for b in doc["benchmarks"] if b["extra_info"].get("resumed")]
    assert len(resumed) == 1
    assert resumed[0]["extra_info"]["median_s"] == json.loads(first[1])["extra_info"]["median_s"]
    # the torn case was measured again (not marked crashed) and appended on a line of its own
    measured = [json.loads(x) for x in j.read_text().splitlines()[4:]]
    assert [e["status"] for e in measured] == ["started", "measured"]
    assert "0001" in r.stdout.str()  # pytest-benchmark's compare against the autosaved run


def test_fast_wrong_answer_fails_and_is_recorded(project):
    r = run(project, *TIMED, "--pk-backend", "fast_wrong", "--pk-journal", "j.jsonl")
    r.assert_outcomes(failed=SMOKE_GEMM_F32, deselected=1)
    assert "wrong answer after timing" in r.stdout.str()
    assert "FAILED test_bench.py::test_gemm[fast_wrong-" in r.stdout.str()  # noted as it happens, then listed
    entries = [json.loads(x) for x in (project.path / "j.jsonl").read_text().splitlines()]
    assert all(e["extra_info"]["ok"] is False for e in entries if e["status"] == "measured")
    smoke = run(project, "--pk-backend", "fast_wrong", "--pk-kernel", "gemm", "--pk-dtype", "float32")
    smoke.assert_outcomes(failed=SMOKE_GEMM_F32, passed=1)


def test_skips_carry_reasons(project):
    r = run(project, *TIMED, "--pk-backend", "triton_interpret", "--pk-backend", "numpy", "--pk-dtype", "bfloat16", "-rs")
    out = r.stdout.str()
    assert "never timed" in out  # triton_interpret is correctness only
    assert "does not support dtype bfloat16" in out  # numpy has float32 only


def test_unknown_backend_is_a_usage_error(project):
    r = run(project, "--pk-backend", "nope")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown backend(s) nope" in r.stderr.str() + r.stdout.str()


def test_model_sweep_runs_exactly_the_models_shapes(project):
    from pykernels.tokens.models import model_problems

    gemms = [p for p in model_problems("tiny", batch=2) if p.family == "gemm"]
    r = run(project, "--benchmark", "--pk-model", "tiny", "--pk-model-batch", "2", "--pk-kernel", "gemm", "--pk-dtype",
            "float32", "--pk-backend", "numpy", "--pk-time-budget", "0.01", "--pk-journal", "j.jsonl")
    r.assert_outcomes(passed=len(gemms), deselected=1)
    ids = {e["extra_info"]["params"]["M"] for e in map(json.loads, (project.path / "j.jsonl").read_text().splitlines())
           if e["status"] == "measured"}
    assert ids == {p.M for p in gemms}


def test_model_sweep_bad_model_is_a_usage_error(project):
    r = run(project, "--pk-bench", "--pk-model", "no-such-model")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--pk-model" in r.stderr.str() + r.stdout.str()
    r = run(project, "--pk-bench", "--pk-model", "tiny", "--pk-sweep", "quick")
    assert r.ret == pytest.ExitCode.USAGE_ERROR


def test_a_record_past_the_bandwidth_peak_probes_again_and_raises_it(tmp_path, monkeypatch):
    from pykernels import pytest_plugin as plugin
    from pykernels.harness import results as hres

    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    fp = {"type": "cpu", "id": "abc123", "name": "x"}
    probes, probes_bps = [], [50e9, 40e9] + [60e9] * 10  # the reps asked for; what each probe finds
    monkeypatch.setattr(device, "hardware_bandwidth_probe",
                        lambda dev, fp, reps=5: probes.append(reps) or {"bytes_per_s": probes_bps[len(probes) - 1]})
    pk = {"version": device.PEAKS_VERSION, "flops": {}, "bandwidth": {"bytes_per_s": 40e9}}
    st = {"reprobes": 0}

    def record(bps=45e9):  # a memory-bound call that read 45 GB/s: past 103% of 40 GB/s, within 50
        return {"bound": "memory", **hres.roofline_fraction(1.0, bps, 1.0, 1e15, device.peak_bandwidth(pk))}

    ex = record()
    assert ex["probe_error"] and ex["bound"] == "memory"
    ex = plugin._past_bandwidth_peak(st, ex, pk, fp, "cpu", record)
    assert probes == [3] and device.peak_bandwidth(pk) == 50e9 and not ex["probe_error"]  # judged against 50 GB/s
    assert device.peak_bandwidth(device.peaks("cpu", [], measure=False, fp=fp)) == 50e9  # and cached for the machine
    # a probe that finds less leaves the peak and the flag as they were
    ex = plugin._past_bandwidth_peak(st, record(55e9), pk, fp, "cpu", record)
    assert len(probes) == 2 and device.peak_bandwidth(pk) == 50e9 and ex["probe_error"]
    # records within the peak, and compute-bound ones, probe nothing
    assert not plugin._past_bandwidth_peak(st, record(), pk, fp, "cpu", record)["probe_error"]
    flops_past = {"bound": "compute", "probe_error": True}
    assert plugin._past_bandwidth_peak(st, flops_past, pk, fp, "cpu", record) is flops_past
    assert len(probes) == 2
    # at most _MAX_REPROBES probes in a run
    for _ in range(2 * plugin._MAX_REPROBES):
        plugin._past_bandwidth_peak(st, record(1e12), pk, fp, "cpu", record)
    assert len(probes) == plugin._MAX_REPROBES and st["reprobes"] == plugin._MAX_REPROBES
