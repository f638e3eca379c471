"""The conformance run catches broken backends and passes good ones."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pykernels.validate import run_validation, to_markdown

HERE = Path(__file__).parent


@pytest.fixture
def broken_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def test_wrong_numbers_on_odd_shapes_are_caught(broken_path):
    rep = run_validation("wrong_odd", plugins=["broken_backends:WrongOnOddShapes"], perf=False, quick=True)
    assert rep["verdict"] == "not conformant"
    failing = rep["failing_cases"]
    assert failing and all(":gemm:" in c for c in failing)
    assert any(c.startswith("correctness:") for c in failing)
    assert any("N1-" in c or "N127-" in c for c in failing)
    assert rep["cases"][0]["status"] == "FAIL"  # failures are listed first
    assert "## Failing cases" in to_markdown(rep)


def test_a_crash_fails_one_case_and_the_run_goes_on(broken_path):
    rep = run_validation("crash_edge", plugins=["broken_backends:CrashOnEdge"], perf=False, quick=True)
    assert rep["verdict"] == "not conformant"
    crashed = [r for r in rep["cases"] if r.get("crashed")]
    assert crashed and all("SIGSEGV" in r["detail"] for r in crashed)
    assert rep["summary"]["worker_restarts"] >= 1
    # Cases after the crash still ran and passed.
    assert sum(r["status"] == "PASS" for r in rep["cases"]) > 10


def test_a_hang_is_a_failure_not_the_end(broken_path):
    rep = run_validation("hang_tiny", plugins=["broken_backends:HangOnTinyAttention"], perf=False, quick=True,
                         case_timeout=4)
    hung = [r for r in rep["cases"] if "hang" in r.get("detail", "")]
    assert hung and rep["verdict"] == "not conformant"


def test_unknown_backend_is_not_conformant():
    rep = run_validation("no_such_backend", perf=False, quick=True)
    assert rep["verdict"] == "not conformant" and "unknown backend" in rep["cases"][0]["detail"]


def test_native_is_conformant_on_cpu():
    rep = run_validation("native", perf=False, quick=True)
    assert rep["verdict"] == "conformant", rep["failing_cases"]
    assert rep["summary"]["unsupported"] > 0  # float16 on CPU: listed, not failed
    assert all(r["status"] != "FAIL" for r in rep["cases"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_causal_inf_reaches_only_the_rows_that_see_it(dtype):
    """validate's inf probe sits in a V row off every block boundary: the native kernels' diagonal tiles multiply it
    by weights of exactly 0 for the earlier rows of its block, and attention() recomputes those rows, so the native
    backend gets no "also reached" warning (torch's SDPA does)."""
    from pykernels.backends import registry
    from pykernels.validate import cases, worker

    case = {"kind": "inf", "family": "attention", "params": cases.ROBUST["attention"], "dtype": dtype}
    r = worker.run_case(registry.get("native"), "cpu", case)
    assert r["status"] == "PASS" and not r.get("warning"), r


def _example_installed() -> bool:
    return any(ep.name == "example_torch" for ep in metadata.entry_points(group="pykernels.backends"))


@pytest.mark.skipif(not _example_installed(), reason="examples/example_plugin is not installed (README set-up does it)")
def test_example_plugin_is_discovered_and_conformant(tmp_path):
    import pykernels as pk

    info = {b.name: b for b in pk.backends()}["example_torch"]
    assert info.available and info.source.startswith("plugin:")
    out = subprocess.run([sys.executable, "-m", "pykernels.validate", "--backend", "example_torch", "--no-perf",
                          "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads((tmp_path / "validate-example_torch-cpu.json").read_text())
    assert rep["verdict"] == "conformant" and len(rep["sha256"]) == 64
    assert (tmp_path / "validate-example_torch-cpu.md").read_text().startswith("# Conformance")


def test_exit_code_is_nonzero_when_not_conformant(tmp_path, broken_path):
    out = subprocess.run([sys.executable, "-m", "pykernels.validate", "--backend", "wrong_odd", "--plugin",
                          "broken_backends:WrongOnOddShapes", "--no-perf", "--quick"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 1 and "NOT CONFORMANT" in out.stdout


def test_performance_section_speedups_and_geomean():
    from pykernels.validate import _performance_markdown, speedups_of

    perf = [{"case": "perf:gemm:float32:M8-N64-K64", "status": "PASS", "median_s": 1e-3, "tflops": 1.0, "gbps": 1.0,
             "pct_of_peak": 50.0, "speedup_vs": {"torch": 2.0, "numpy": 0.5}, "penalty_vs": {}},
            {"case": "perf:gemm:float32:M64-N64-K64", "status": "PASS", "median_s": 1e-3, "tflops": 1.0, "gbps": 1.0,
             "pct_of_peak": 50.0, "speedup_vs": {"torch": 8.0}, "penalty_vs": {}}]
    md = "\n".join(_performance_markdown({"backend": "mine", "performance": perf}))
    assert "| over numpy | over torch |" in md
    assert "| 0.50× | 2.00× |" in md and "| — | 8.00× |" in md
    assert "**0.50×** (1 cases) | **4.00×** (2 cases)" in md  # geometric means: 0.5; sqrt(2 * 8)
    # a report written before speedup_vs existed: speedup = 1 - penalty
    assert speedups_of({"penalty_vs": {"torch": -1.0}}) == {"torch": 2.0}
