"""The native hardware peak probes (csrc/cpu/probes.cpp, csrc/cuda/probes.cu) and the thread pinning of a run
(--threads / --pk-threads, pykernels/harness/threads.py)."""

from __future__ import annotations

import json
import math
import platform

import pytest

from pykernels import cli
from pykernels.harness import device, threads

pytest_plugins = ["pytester"]

_C = pytest.importorskip("pykernels._C", reason="the native extension is not built")

KINDS = _C.probe_kinds()
CPU_KINDS = KINDS["compute"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
SMALL = 4 << 20  # bytes per array in the fast memory cases (not a peak: it fits the LLC)


def _flags() -> set[str]:
    return set(device._cpuinfo().get("flags", "").split())


def test_probe_kinds_shape():
    assert set(KINDS) >= {"compute", "memory", "clock", "cuda_compute", "cuda_memory"}
    assert KINDS["memory"] == ["read", "copy", "triad", "copy_nt"]
    assert isinstance(KINDS["clock"], bool)
    known = {"avx2_fp32", "avx512_fp32", "avx512_bf16", "avx512_fp16", "amx_bf16", "neon_fp32"}
    assert set(CPU_KINDS) <= known and len(set(CPU_KINDS)) == len(CPU_KINDS)
    if X86:  # what CPUID says must match what the kernel reports in /proc/cpuinfo
        flags = _flags()
        assert ("avx2_fp32" in CPU_KINDS) == ("avx2" in flags and "fma" in flags)
        assert ("avx512_fp32" in CPU_KINDS) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
        assert ("avx512_bf16" in CPU_KINDS) == ("avx512_bf16" in flags and "avx512_fp32" in CPU_KINDS)
        assert ("avx512_fp16" in CPU_KINDS) == ("avx512_fp16" in flags and "avx512_fp32" in CPU_KINDS)
        if "amx_bf16" not in flags:
            assert "amx_bf16" not in CPU_KINDS
    if not _C.has_cuda:
        assert KINDS["cuda_compute"] == [] and KINDS["cuda_memory"] == []
    else:
        assert set(KINDS["cuda_compute"]) <= {"fma_fp32", "mma_bf16", "mma_fp16"}
        assert set(KINDS["cuda_memory"]) <= {"read", "copy"}


@pytest.mark.parametrize("kind", CPU_KINDS or [pytest.param("none", marks=pytest.mark.skip(reason="no probe here"))])
def test_compute_probe_finite_positive(kind):
    r = _C.probe_compute(kind, None, 0.05)
    assert math.isfinite(r["flops"]) and r["flops"] > 0
    assert r["flops_cpu_time"] >= 0.99 * r["flops"]  # CPU time <= wall time per thread
    # AMX has 4 accumulator tiles of 16 x 16 fp32 (the other 4 tile registers hold the operands)
    assert r["threads"] == _C.get_num_threads() and r["accumulators"] >= (4 if kind.startswith("amx") else 8)
    assert r["instruction"].split()[0] in {"vfmadd231ps", "vdpbf16ps", "vfmadd231ph", "tdpbf16ps", "fmla"}
    assert len(r["trial_seconds"]) >= 5 and all(t > 0 for t in r["trial_seconds"])
    one = _C.probe_compute(kind, 1, 0.05)
    assert one["threads"] == 1 and one["flops"] > 0


@pytest.mark.parametrize("kind", KINDS["memory"])
def test_memory_probe_finite_positive(kind):
    r = _C.probe_memory(kind, SMALL + 100, None, 2)
    assert math.isfinite(r["gbs"]) and r["gbs"] > 0
    assert r["nbytes"] == SMALL + 64 and len(r["rep_seconds"]) == 2  # rounded down to whole 64-byte lines
    factor = {"read": 1, "copy": 2, "copy_nt": 2, "triad": 3}[kind]
    assert r["bytes_per_rep"] == factor * r["nbytes"]
    assert r["gbs"] == pytest.approx(r["bytes_per_rep"] / min(r["rep_seconds"]) / 1e9)
    assert r["threads"] == _C.get_num_threads()
    if kind == "copy_nt" and X86:
        assert r["store"].startswith("non-temporal")


def test_memory_probe_default_size_is_4x_llc():
    from pykernels.harness import timing

    r = _C.probe_memory("read", None, 1, 1)
    assert r["nbytes"] == max(256 << 20, 4 * timing.cpu_llc_bytes()) // 64 * 64


def test_read_pass_reads_a_kept_array():
    """_C.ReadPass: the read probe over an array allocated once (tools/issue6.py times it in the same rounds as
    a kernel); its rate agrees with probe_memory's read on the same size, within the noise of a shared machine."""
    r = _C.ReadPass(SMALL + 100, None)
    assert r.nbytes == SMALL + 64
    t = [r.run() for _ in range(5)]
    assert all(math.isfinite(x) and x > 0 for x in t)
    ref = _C.probe_memory("read", SMALL + 100, None, 5)
    assert 0.2 < (r.nbytes / min(t) / 1e9) / ref["gbs"] < 5
    from pykernels.harness import timing

    assert _C.ReadPass(None, 1).nbytes == max(256 << 20, 4 * timing.cpu_llc_bytes()) // 64 * 64


@pytest.mark.parametrize("kw,name", [({"nbytes": 10}, "nbytes"), ({"nbytes": -1}, "nbytes"),
                                     ({"nbytes": 1 << 60}, "nbytes"), ({"threads": 0}, "threads"),
                                     ({"threads": 10**30}, "threads")])
def test_read_pass_bad_arguments_name_them(kw, name):
    with pytest.raises(ValueError, match=name):
        _C.ReadPass(**kw)


def test_read_pass_wrong_types_name_them():
    with pytest.raises(TypeError, match="nbytes"):
        _C.ReadPass("4096")
    with pytest.raises(TypeError, match="threads"):
        _C.ReadPass(None, 1.5)


def test_compute_pass_runs_fixed_work():
    """_C.ComputePass: a compute probe's loop with fixed work (tools/issue6.py times it in the same rounds as
    the compute-bound kernels); its rate agrees with probe_compute's wall figure within a shared machine's noise."""
    if not KINDS["compute"]:
        pytest.skip("no compute probe runs here")
    kind = KINDS["compute"][-1]
    c = _C.ComputePass(kind, None, 0.005)
    assert c.kind == kind and c.threads >= 1 and c.flop > 0
    t = [c.run() for _ in range(5)]
    assert all(math.isfinite(x) and x > 0 for x in t)
    ref = _C.probe_compute(kind, None, 0.1)
    assert 0.2 < (c.flop / min(t)) / ref["flops"] < 5
    assert _C.ComputePass(kind, 1, 0.005).threads == 1


@pytest.mark.parametrize("kw,name", [({"kind": "nope"}, "kind"), ({"threads": 0}, "threads"),
                                     ({"threads": 10**30}, "threads"), ({"seconds": 0.0}, "seconds"),
                                     ({"seconds": float("nan")}, "seconds"), ({"seconds": 1e9}, "seconds")])
def test_compute_pass_bad_arguments_name_them(kw, name):
    args = {"kind": (KINDS["compute"] or ["avx512_fp32"])[-1]} | kw
    with pytest.raises(ValueError, match=name):
        _C.ComputePass(**args)


def test_compute_pass_wrong_types_name_them():
    with pytest.raises(TypeError, match="threads"):
        _C.ComputePass("avx512_fp32", 1.5)
    with pytest.raises(TypeError):
        _C.ComputePass(3)


@pytest.mark.skipif(not KINDS["clock"], reason="no clock probe for this ISA")
def test_clock_probe():
    r = _C.probe_clock(None)
    assert 0.3 < r["ghz_min"] <= r["ghz"] <= r["ghz_max"] < 10
    assert len(r["per_thread_ghz"]) == r["threads"] == _C.get_num_threads()
    assert _C.probe_clock(1)["threads"] == 1


BAD = [
    (lambda: _C.probe_compute("nope", None, 0.05), "kind"),
    (lambda: _C.probe_compute("avx2_fp32", 0, 0.05), "threads"),
    (lambda: _C.probe_compute("avx2_fp32", -3, 0.05), "threads"),
    (lambda: _C.probe_compute("avx2_fp32", 10**30, 0.05), "threads"),
    (lambda: _C.probe_compute("avx2_fp32", None, 0.0), "seconds"),
    (lambda: _C.probe_compute("avx2_fp32", None, float("nan")), "seconds"),
    (lambda: _C.probe_compute("avx2_fp32", None, 1e9), "seconds"),
    (lambda: _C.probe_memory("stream", None, None, 1), "kind"),
    (lambda: _C.probe_memory("copy", 0, None, 1), "nbytes"),
    (lambda: _C.probe_memory("copy", -4096, None, 1), "nbytes"),
    (lambda: _C.probe_memory("copy", 1 << 60, None, 1), "nbytes"),
    (lambda: _C.probe_memory("triad", 10**30, None, 1), "nbytes"),
    (lambda: _C.probe_memory("copy", SMALL, 0, 1), "threads"),
    (lambda: _C.probe_memory("copy", SMALL, None, 0), "reps"),
    (lambda: _C.probe_memory("copy", SMALL, None, 10**6), "reps"),
    (lambda: _C.probe_clock(0), "threads"),
    (lambda: _C.set_num_threads(0), "'n'"),
]


@pytest.mark.parametrize("call,name", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    if name in ("threads", "seconds") and "avx2_fp32" not in CPU_KINDS:
        pytest.skip("needs the avx2_fp32 probe to get past the kind check")
    with pytest.raises(ValueError, match=name):
        call()


def test_wrong_types_raise_type_error_naming_them():
    with pytest.raises(TypeError, match="threads"):
        _C.probe_clock("2")
    with pytest.raises(TypeError, match="nbytes"):
        _C.probe_memory("read", 4096.0, None, 1)
    with pytest.raises(TypeError, match="threads"):
        _C.probe_memory("read", SMALL, True, 1)


@pytest.mark.skipif(not X86, reason="amx_bf16 is an x86 probe")
def test_known_kind_that_does_not_run_here_says_so():
    if "amx_bf16" in CPU_KINDS:
        pytest.skip("this CPU runs AMX")
    with pytest.raises(ValueError, match="argument 'kind'.*does not run on this machine"):
        _C.probe_compute("amx_bf16", None, 0.05)


def test_cuda_probes_without_cuda():
    if _C.has_cuda and KINDS["cuda_compute"]:
        pytest.skip("a CUDA device is present (the CUDA probes are checked on it, see docs)")
    if not _C.has_cuda:
        with pytest.raises(RuntimeError, match="without CUDA"):
            _C.probe_cuda_compute("fma_fp32", 0.05)
        with pytest.raises(RuntimeError, match="without CUDA"):
            _C.probe_cuda_memory("read", None, 1)
    else:  # built with CUDA, no device: no kind runs here
        with pytest.raises(ValueError, match="kind"):
            _C.probe_cuda_compute("fma_fp32", 0.05)


# ---- the probes against the micro-architecture's FLOP/cycle table ------------------------------------------


def _fp32_kind():
    return next((k for k in device._CPU_PROBES["float32"] if k in CPU_KINDS), None)


def test_fp32_probe_against_cores_x_clock_x_flop_per_cycle():
    """Cores x measured clock x FLOP/cycle/core of device.CPU_FLOP_PER_CYCLE. The rate compared is per second of
    each thread's CPU time (flops_cpu_time), which holds on a machine shared with other jobs: measured on the
    2-core Zen 4 VM under a load average of 8 it was 1.00 of the table (235 GFLOP/s at 3.68 GHz x 32 x 2) while
    the wall-clock figure was 8-100% of it. Zen 4 runs AVX-512 FMA on two 256-bit pipes: 32 fp32 FLOP/cycle/core,
    64 with vdpbf16ps (AMD, "Software Optimization Guide for the AMD Zen4 Microarchitecture"). Bounds are loose (clock drift between the two probes, turbo), but a
    miscounted FLOP per instruction (x2) or merged chains (/4 or worse) fall outside them."""
    info = device._cpuinfo()
    arch = device.cpu_arch(info, _flags())
    kind = _fp32_kind()
    if arch not in device.CPU_FLOP_PER_CYCLE or kind is None or not KINDS["clock"]:
        pytest.skip(f"micro-architecture {arch!r} not in CPU_FLOP_PER_CYCLE, or no fp32 probe / clock probe here")
    n = min(2, _C.get_num_threads())
    r = _C.probe_compute(kind, n, 0.2)
    ghz = _C.probe_clock(n)["ghz_max"]
    expected = n * ghz * 1e9 * device.CPU_FLOP_PER_CYCLE[arch]["float32"]
    ratio = r["flops_cpu_time"] / expected
    assert 0.6 < ratio < 1.3, f"{kind}: {r['flops_cpu_time'] / 1e9:.1f} GFLOP/s vs {expected / 1e9:.1f} expected"
    assert r["flops"] / expected < 1.3


def test_bf16_dot_probe_against_the_table():
    arch = device.cpu_arch(device._cpuinfo(), _flags())
    if arch not in ("zen4", "zen5") or "avx512_bf16" not in CPU_KINDS or not KINDS["clock"]:
        pytest.skip("vdpbf16ps FLOP/cycle is in the table for Zen 4 / Zen 5 only")
    r = _C.probe_compute("avx512_bf16", 1, 0.2)
    ghz = _C.probe_clock(1)["ghz_max"]
    ratio = r["flops_cpu_time"] / (ghz * 1e9 * device.CPU_FLOP_PER_CYCLE[arch]["bfloat16"])
    assert 0.6 < ratio < 1.3


# ---- pykernels info --peaks, --threads --------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = (threads.state()["torch"], _C.get_num_threads())
    yield
    threads.unpin_threads()
    import torch

    torch.set_num_threads(before[0])
    _C.set_num_threads(before[1])


def test_info_peaks_prints_the_probe_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    # the vendor ceiling (torch.matmul up to 4096^3) is not what this test is about: a fixed figure keeps it short
    monkeypatch.setattr(device, "compute_probe", lambda *a, **k: {"flops_per_s": 1e9, "n": 256, "median_s": 1.0,
                                                                  "probe": "square torch.matmul"})
    monkeypatch.setattr(device, "hardware_bandwidth_probe",
                        lambda dev, fp, reps=5, f=device.hardware_bandwidth_probe: f(dev, fp, reps=1))
    assert cli.main(["info", "--device", "cpu", "--peaks", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "STREAM-style read, copy, triad, copy_nt" in out and "copy_nt" in out
    assert "run threads" in out and "affinity" in out
    fp32 = [k for k in device._CPU_PROBES["float32"] if k in CPU_KINDS]
    if fp32:  # the fastest fp32 kind in this run wins (AVX2 and AVX-512 tie on Zen 4)
        insts = {_C.probe_compute(k, 1, 0.01)["instruction"] for k in fp32}
        assert any(f"register-resident {i} loop" in out for i in insts), out
        assert "FLOP/cycle/core at" in out  # with the clock probe
    doc = json.loads((next(tmp_path.glob("peaks-cpu-*.json"))).read_text())
    assert doc["bandwidth"]["best"] in ("read", "copy", "triad", "copy_nt")
    assert set(doc["bandwidth"]["runs_bytes_per_s"]) == {"read", "copy", "triad", "copy_nt"}


def test_pin_threads_sets_every_pool(restore_threads):
    st = threads.pin_threads(1)
    assert st["requested"] == 1 and st["torch"] == 1 and st["native"] == 1
    assert _C.probe_compute(CPU_KINDS[0], None, 0.01)["threads"] == 1 if CPU_KINDS else True
    assert st["affinity"] is None or len(st["affinity"]) >= 1
    if st["pools"] is not None:
        assert all(p["threads"] == 1 for p in st["pools"] if p["api"] == "openmp")
    threads.unpin_threads()
    assert threads.state()["torch"] >= 1


@pytest.mark.parametrize("bad", [0, -2, "x", 1.5, True])
def test_check_threads_rejects(bad):
    with pytest.raises(ValueError, match="threads"):
        threads.check_threads(bad)


def test_cli_threads_option(capsys, tmp_path, monkeypatch, restore_threads):
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    assert cli.main(["info", "--device", "cpu", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert cli.main(["info", "--device", "cpu", "--threads", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["threads"]["requested"] == 1 and doc["threads"]["native"] == 1 and doc["device"]["threads"] == 1
    assert "--pk-threads=3" in cli.bench_argv(cli.build_parser().parse_args(["bench", "--threads", "3"]))


def test_plugin_pk_threads_bad_value_is_a_usage_error(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    r = pytester.runpytest_inprocess("-p", "pykernels.pytest_plugin", "-p", "no:cacheprovider", "--pk-threads", "0")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--pk-threads" in r.stderr.str()


def test_plugin_pk_threads_pins_records_and_restores(pytester, monkeypatch):
    import torch

    before = torch.get_num_threads(), _C.get_num_threads()
    cache = pytester.path / "cache"
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(cache))
    fp = device.fingerprint("cpu")
    fp["threads"] = 1  # the run's fingerprint: pinned to one thread (a different machine id, its own peaks)
    cache.mkdir()
    (cache / f"peaks-cpu-{device.machine_id(fp)}.json").write_text(json.dumps({
        "version": device.PEAKS_VERSION, "bandwidth": {"bytes_per_s": 1e12},
        "flops": {"float32": {"flops_per_s": 4e11}}, "vendor_ceiling": {"float32": {"flops_per_s": 4e11}}}))
    pytester.makepyfile(test_bench='''
import pytest

@pytest.mark.pykernels_bench("gemm")
def test_gemm(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
''')
    r = pytester.runpytest_inprocess("-p", "pykernels.pytest_plugin", "-p", "no:cacheprovider", "--pk-bench",
                                     "--pk-sweep", "smoke", "--pk-kernel", "gemm", "--pk-dtype", "float32",
                                     "--pk-backend", "torch", "--pk-time-budget", "0.02", "--pk-threads", "1",
                                     "--benchmark-storage", "file://store", "--benchmark-save", "t")
    assert r.ret == 0, r.stdout.str()[-2000:]
    (path,) = pytester.path.glob("store/*/*t.json")
    mi = json.loads(path.read_text())["machine_info"]["pykernels"]
    assert mi["threads"]["requested"] == 1 and mi["threads"]["torch"] == 1 and mi["threads"]["native"] == 1
    assert mi["device"]["threads"] == 1 and mi["threads"]["affinity"]
    assert (torch.get_num_threads(), _C.get_num_threads()) == before  # restored at unconfigure


def test_hardware_compute_probe_is_the_cpu_time_rate():
    """The CPU peak is per second of the threads' own CPU time, never below the wall figure (a probe taken while
    other jobs share the cores must not set a low peak)."""
    if _fp32_kind() is None:
        pytest.skip("no fp32 probe here")
    r = device.hardware_compute_probe("cpu", "float32", 0.1)
    assert r["flops_per_s"] >= r["flops_wall"] > 0 and r["kind"] in CPU_KINDS
