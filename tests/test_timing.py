"""pykernels.timing: the statistics, the stopping rule, batching, flush sizing and the CPU timer (with a
fake clock, so the numbers are exact). The CUDA timer runs only where a GPU is present."""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import pytest
import torch

from pykernels.harness import timing


@pytest.mark.parametrize("n", [1, 2, 5, 63, 64, 65, 1000])
@pytest.mark.parametrize("q", [0, 20, 50, 80, 100])
def test_percentile_matches_numpy(n, q):
    rng = random.Random(n)
    xs = sorted(rng.uniform(1e-6, 1e-3) for _ in range(n))
    assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        timing.percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        timing.percentile([1.0], 101)


def test_summarize_fields():
    xs = [float(x) for x in range(1, 101)]  # 1..100
    st = timing.summarize(xs, calls_per_round=3, timer="t", stopped_by="rse")
    assert st.median_s == 50.5
    assert st.p20_s == pytest.approx(np.percentile(xs, 20))
    assert st.p80_s == pytest.approx(np.percentile(xs, 80))
    assert st.min_s == 1 and st.max_s == 100 and st.rounds == 100 and st.calls_per_round == 3
    assert st.cv == pytest.approx(np.std(xs, ddof=1) / np.mean(xs))
    assert st.p20_s <= st.median_s <= st.p80_s
    d = st.as_dict()
    assert "samples" not in d and d["stopped_by"] == "rse"
    assert len(st.as_dict(with_samples=True)["samples"]) == 100


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [1.0, math.nan], [math.inf]])
def test_summarize_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        timing.summarize(bad)


def test_rse_of_median():
    assert timing.rse_of_median([1.0, 2.0]) == math.inf  # too few samples for an estimate
    assert timing.rse_of_median([3.0] * 10) == 0.0
    rng = random.Random(0)
    small = [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(100)]
    big = [1.0 + 0.1 * rng.gauss(0, 1) for _ in range(10000)]
    # normal data, sigma 0.1: the median's standard error is 1.2533 * 0.1 / sqrt(n)
    assert timing.rse_of_median(small) == pytest.approx(1.2533 * 0.1 / 10, rel=0.3)
    assert timing.rse_of_median(big) == pytest.approx(1.2533 * 0.1 / 100, rel=0.1)
    # scale-free: the same samples in other units have the same relative error
    assert timing.rse_of_median([x * 1e-6 for x in small]) == pytest.approx(timing.rse_of_median(small))
    # robust: a few huge outliers (another job on the core) barely move it
    spiked = small[:95] + [100.0] * 5
    assert timing.rse_of_median(spiked) < 2 * timing.rse_of_median(small)


@pytest.mark.parametrize(("call_s", "expected"), [(1.0, 1), (20e-6, 1), (19e-6, 2), (1e-6, 20), (3e-7, 67),
                                                  (0.0, 10_000), (1e-12, 10_000)])
def test_calls_per_sample(call_s, expected):
    assert timing.calls_per_sample(call_s, 20e-6) == expected


def test_should_stop_rule():
    opts = timing.TimingOptions(min_rounds=5, max_rounds=50, budget_s=1.0, rse_target=0.01)
    assert timing.should_stop([1.0] * 4, 10.0, opts) == ""           # under min_rounds: never, budget or not
    assert timing.should_stop([1.0] * 5, 0.0, opts) == "rse"          # converged
    noisy = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert timing.should_stop(noisy, 0.5, opts) == ""                 # not converged, budget left
    assert timing.should_stop(noisy, 1.0, opts) == "budget"
    assert timing.should_stop(noisy * 10, 0.0, opts) == "max_rounds"


@pytest.mark.parametrize(("cache", "expected_mib"), [
    (50 << 20, 100),          # H100: 50 MiB L2 -> 100 MiB
    (40 << 20, 80),           # A100
    (6 << 20, 12),
    (1000, 4),                # tiny caches: the 4 MiB floor
    ((1 << 20) + 1, 4),
    (3 * (1 << 20) + 1, 7),   # 2x rounded up to a whole MiB
    (32 << 20, 64),           # this CPU's L3
])
def test_flush_size(cache, expected_mib):
    n = timing.flush_size(cache)
    assert n == expected_mib << 20
    assert n >= 2 * cache and n % (1 << 20) == 0


def test_flush_size_rejects_negative():
    with pytest.raises(ValueError):
        timing.flush_size(-1)


def test_cpu_llc_bytes_is_plausible():
    n = timing.cpu_llc_bytes()
    assert (256 << 10) <= n <= (4 << 30)


def test_graph_and_launch_arithmetic():
    # 100 calls: flush+fn graph 3 ms, flush-only graph 1 ms -> 20 us per call
    assert timing.graph_kernel_time(3e-3, 1e-3, 100) == pytest.approx(20e-6)
    assert timing.graph_kernel_time(1e-3, 1.1e-3, 10) == 0.0  # noise never gives a negative time
    with pytest.raises(ValueError):
        timing.graph_kernel_time(1.0, 0.5, 0)
    assert timing.launch_overhead(15e-6, 10e-6) == pytest.approx(5e-6)
    assert timing.launch_overhead(9e-6, 10e-6) == 0.0


class FakeClock:
    """A nanosecond clock that advances only when the timed function says so."""

    def __init__(self):
        self.ns = 0

    def __call__(self) -> int:
        self.ns += 1  # reading the clock costs 1 ns
        return self.ns


def test_time_cpu_exact_with_fake_clock():
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(1)
        clock.ns += 1_000_000  # 1 ms per call

    st = timing.time_cpu(fn, timing.TimingOptions(warmup_s=0.0, warmup_calls=3, min_rounds=7), clock=clock)
    assert st.median_s == pytest.approx(1e-3, rel=1e-5)
    assert st.rounds == 7 and st.stopped_by == "rse" and st.calls_per_round == 1
    assert len(calls) == 3 + 7  # warmup calls are not samples


def test_time_cpu_long_calls_get_three_rounds():
    clock = FakeClock()
    rng = random.Random(2)

    def fn():
        clock.ns += int(1e9 * rng.uniform(0.5, 0.6))  # ~0.55 s a call, budget 1 s: 5 rounds would overrun it

    st = timing.time_cpu(fn, timing.TimingOptions(warmup_s=0.0, budget_s=1.0, rse_target=1e-9), clock=clock)
    assert st.rounds == 3 and st.stopped_by == "budget"


def test_time_cpu_batches_short_calls():
    clock = FakeClock()

    def fn():
        clock.ns += 1000  # 1 us per call -> 20 calls per 20 us sample

    st = timing.time_cpu(fn, timing.TimingOptions(warmup_s=0.0, warmup_calls=2), clock=clock)
    assert st.calls_per_round == 20
    assert st.median_s == pytest.approx(1e-6, rel=1e-3)


def test_round_robin_batches_short_calls_warm_only():
    # time_round_robin_cpu reads the real clock: a call that sleeps is long, one that does nothing is short.
    def short():
        pass

    def long():
        time.sleep(0.003)

    opts = timing.TimingOptions(budget_s=0.05, min_rounds=3, rse_target=1e-9)
    st_short, st_long = timing.time_round_robin_cpu([short, long], opts)
    assert st_short.calls_per_round > 1 and st_long.calls_per_round == 1
    assert st_short.median_s < 1e-5 and st_long.median_s >= 3e-3  # per call, not per batch
    seen = []
    cold = timing.time_round_robin_cpu([lambda: seen.append(1)], timing.TimingOptions(
        budget_s=0.01, min_rounds=3, flush=True, evict=()))
    assert cold[0].calls_per_round == 1 and len(seen) == cold[0].rounds + 1  # one call per sample, + warm-up


def test_round_robin_setups_run_before_each_sample_untimed():
    state = {"v": None}
    seen = {"a": [], "b": []}

    def call(name):
        def f():
            seen[name].append(state["v"])
        return f

    def slow_set(v):
        def setup():
            time.sleep(0.002)  # untimed: must not reach the samples
            state["v"] = v
        return setup

    opts = timing.TimingOptions(budget_s=0.05, min_rounds=3, rse_target=1e-9)
    st_a, st_b = timing.time_round_robin_cpu([call("a"), call("b")], opts, setups=[slow_set("A"), slow_set("B")])
    assert set(seen["a"]) == {"A"} and set(seen["b"]) == {"B"}  # each callable ran under its own setting only
    assert st_a.median_s < 1e-4 and st_b.median_s < 1e-4  # the 2 ms setups are outside the timed calls
    with pytest.raises(ValueError, match="setups"):
        timing.time_round_robin_cpu([call("a")], opts, setups=[None, None])


def test_time_cpu_stops_on_budget_when_noisy():
    clock = FakeClock()
    rng = random.Random(1)

    def fn():
        clock.ns += int(1e6 * rng.uniform(1, 3))  # +-50% noise: never converges to the 1e-9 target

    opts = timing.TimingOptions(warmup_s=0.0, budget_s=0.2, rse_target=1e-9)
    st = timing.time_cpu(fn, opts, clock=clock)
    assert st.stopped_by == "budget"
    assert st.rounds * 2e-3 >= 0.2 * 0.5  # the fake clock says ~0.2 s were spent measuring


def test_time_cpu_real_callable_and_flush():
    a = torch.randn(64, 64)
    st = timing.time_cpu(lambda: a @ a, timing.TimingOptions(budget_s=0.05, warmup_s=0.0))
    assert st.rounds >= 3 and 0 < st.p20_s <= st.median_s <= st.p80_s and st.timer.startswith("cpu")
    cold = timing.time_cpu(lambda: a @ a, timing.TimingOptions(budget_s=0.05, warmup_s=0.0, flush=True))
    assert cold.flush and cold.calls_per_round == 1


def test_time_callable_dispatch():
    st = timing.time_callable(lambda: None, "cpu", timing.TimingOptions(budget_s=0.01, warmup_s=0.0))
    assert st.timer == "cpu perf_counter_ns"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("n", [256, 4096])
def test_time_cuda_agrees_with_triton_do_bench(n):
    """Issue 3: the CUDA timer within 3% of triton.testing.do_bench on the same kernel (unverified here)."""
    triton_testing = pytest.importorskip("triton.testing")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    fn = lambda: a @ a
    st = timing.time_cuda(fn, timing.TimingOptions(budget_s=1.0, flush=True))
    ref = triton_testing.do_bench(fn, return_mode="median") * 1e-3
    assert st.launch_overhead_s is not None and st.launch_overhead_s >= 0
    assert st.median_s == pytest.approx(ref, rel=0.03)


# ---------------------------------------------------------------------------------------------------
# pykernels.device: spec figures, the peaks cache


@pytest.mark.parametrize(("name", "bf16", "bw"), [("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
                                                  ("NVIDIA H100 PCIe", 756e12, 2.0e12),
                                                  ("NVIDIA H200", 989e12, 4.8e12),
                                                  ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12)])
def test_gpu_spec_figures(name, bf16, bw):
    from pykernels.harness import device

    spec = device.spec_peaks({"type": "cuda", "name": name})
    assert spec["flops"]["bfloat16"] == bf16 and spec["bandwidth"] == bw and spec["source"]
    assert device.spec_peaks({"type": "cuda", "name": "Some Future GPU"}) == {}


def test_cpu_spec_estimate_and_fingerprint():
    from pykernels.harness import device

    spec = device.spec_peaks({"type": "cpu", "arch": "zen4", "mhz": 2500.0, "threads": 2})
    assert spec["flops"]["float32"] == 2 * 2.5e9 * 32 and spec["bandwidth"] is None
    assert device.spec_peaks({"type": "cpu", "arch": None, "mhz": 2500.0}) == {}
    fp = device.fingerprint("cpu")
    assert fp["type"] == "cpu" and fp["threads"] >= 1 and len(fp["id"]) == 12 and fp["versions"]["torch"]
    assert fp["id"] == device.machine_id(fp)  # stable: the peaks cache key
    json_ok = __import__("json").dumps(fp)
    assert json_ok


def test_peaks_cache_roundtrip_and_raise(tmp_path, monkeypatch):
    from pykernels.harness import device

    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    fp = {"type": "cpu", "id": "abc123", "name": "x"}
    assert device.peaks("cpu", ["float32"], measure=False, fp=fp)["flops"] == {}  # nothing cached, nothing measured
    pk = {"version": device.PEAKS_VERSION, "flops": {}, "bandwidth": {"bytes_per_s": 10e9}}
    assert not device.raise_bandwidth_peak(pk, fp, {"bytes_per_s": 5e9})  # a busy-machine probe never lowers it
    assert device.raise_bandwidth_peak(pk, fp, {"bytes_per_s": 30e9})
    again = device.peaks("cpu", ["float32"], measure=False, fp=fp)
    assert device.peak_bandwidth(again) == 30e9 and again["cache"].startswith(str(tmp_path))


def test_measure_case_gives_throughput_and_peak_fraction(tmp_path, monkeypatch):
    """The performance section of `pykernels validate` times through this (peaks from a seeded cache)."""
    import json

    from pykernels.harness import device
    from pykernels.kernels import GemmProblem

    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    fp = device.fingerprint("cpu")
    (tmp_path / f"peaks-cpu-{fp['id']}.json").write_text(json.dumps({
        "version": device.PEAKS_VERSION, "bandwidth": {"bytes_per_s": 1e10},
        "flops": {"float32": {"flops_per_s": 1e11}}}))
    prob = GemmProblem(M=33, N=64, K=127)
    inputs = prob.make_inputs(torch.float32, "cpu", seed=0)
    from pykernels.harness.measure import measure_case

    r = measure_case(prob, torch.float32, "torch", "cpu", inputs=inputs, budget_s=0.05)
    assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
    assert r["tflops"] == pytest.approx(prob.flops() / r["median_s"] / 1e12)
    assert r["pct_of_peak"] is not None and r["pct_of_peak"] > 0


def test_settle_waits_before_the_warmup():
    """settle_s: the CPU timer sleeps before its first call (other runtimes' spinning pools go idle)."""
    first = []

    def fn():
        if not first:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    timing.time_cpu(fn, timing.TimingOptions(settle_s=0.1, budget_s=0.01, warmup_s=0.0, min_rounds=3))
    assert first[0] - t0 >= 0.1


def test_importing_pykernels_quiets_openblas_unless_set():
    import subprocess
    import sys

    code = "import os, pykernels; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_THREAD_TIMEOUT": "9"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "9"


# ---------------------------------------------------------------------------------------------------
# sample sanity: a descheduled thread looks like a stable, slow kernel


def _sched(clock, per_call_ns):
    """fn advancing the fake clock by per_call_ns(call index)."""
    calls = [0]

    def fn():
        clock.ns += per_call_ns(calls[0])
        calls[0] += 1

    return fn, calls


def test_time_cpu_remeasures_a_descheduled_spell():
    # warm-up calls take 1 ms; the first measurement is descheduled (16 ms a call, tight); then 1 ms again
    clock = FakeClock()
    opts = timing.TimingOptions(warmup_s=0.0, warmup_calls=3, min_rounds=5, max_rounds=5)
    fn, _ = _sched(clock, lambda i: 16_000_000 if 3 <= i < 8 else 1_000_000)
    st = timing.time_cpu(fn, opts, clock=clock)
    assert st.remeasured == 1 and st.warning == ""
    assert st.median_s == pytest.approx(1e-3, rel=1e-3)


def test_time_cpu_warns_when_samples_stay_implausible():
    clock = FakeClock()
    opts = timing.TimingOptions(warmup_s=0.0, warmup_calls=3, min_rounds=5, max_rounds=5)
    fn, _ = _sched(clock, lambda i: 1_000_000 if i < 3 else 16_000_000)  # slow for good after the warm-up
    st = timing.time_cpu(fn, opts, clock=clock)
    assert st.remeasured == timing.SANITY_RETRIES
    assert "16x the fastest warm-up call" in st.warning or "x the fastest warm-up call" in st.warning
    assert st.as_dict()["warning"]  # lands in the record (extra_info)


def test_bimodal_samples_are_flagged():
    assert timing.bimodal([1.0] * 6 + [3.0] * 4)
    assert not timing.bimodal([1.0, 1.1, 1.05, 0.98, 1.02, 1.2, 0.99])
    assert not timing.bimodal([1.0] * 9 + [5.0])  # one outlier is noise, not a second mode
    assert timing.sanity_problem([1.0] * 5, 0.2).startswith("median")
    assert timing.sanity_problem([1.0] * 5, None) == ""


# ---------------------------------------------------------------------------------------------------
# machine identity


def test_cpu_model_changes_the_machine_id_and_reports_keep_them_apart(tmp_path):
    import json

    from pykernels.harness import device, results
    from pykernels.kernels import GemmProblem

    base = {"type": "cpu", "host": "vm", "name": "AMD EPYC", "vendor": "AuthenticAMD", "family_model": "25/17",
            "stepping": "1", "isa": ["avx2", "avx512f"], "cores": 2, "threads": 2, "caches": {"l3": 32 << 20}}
    other = dict(base, family_model="26/2")
    assert device.machine_id(base) != device.machine_id(other)
    assert device.machine_id(base) == device.machine_id(dict(base, versions={"torch": "x"}, mhz=1.0))
    st = timing.summarize([1e-3, 1.1e-3, 1.2e-3]).as_dict()
    for fp, name in ((base, "a.json"), (other, "b.json")):
        ex = results.make_record(problem=GemmProblem(64, 64, 64), backend_name="native", tier="native",
                                 device="cpu", device_name=device.device_label(fp), machine_id=device.machine_id(fp),
                                 dtype="float32", stats=st, max_error=0.0, tolerance=1e-5, ok=True)
        (tmp_path / name).write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": ex}],
                                                 "machine_info": {}}))
    recs = results.load_many([tmp_path / "a.json", tmp_path / "b.json"])
    assert len(recs) == 2 and len({r.machine for r in recs}) == 2, [r.machine for r in recs]


def test_microarch_names():
    from pykernels.harness import device

    amd = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1"}
    assert device.cpu_microarch(amd) == ("zen3", "Zen 3")
    assert device.cpu_microarch(dict(amd, model="17"))[0] == "zen4"
    assert device.cpu_microarch(dict(amd, **{"cpu family": "26", "model": "2"}))[0] == "zen5"
    assert device.cpu_microarch({"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"})[0] == "sapphire_rapids"
    assert device.cpu_microarch({"vendor_id": "Foo"}) is None
    assert device.device_label({"type": "cpu", "name": "AMD EPYC", "microarch": "Zen 3", "threads": 2}) == \
        "cpu: AMD EPYC Zen 3 (2 threads)"


def test_evict_cpu_flushes_given_tensors_and_checks_its_arguments():
    """timing.evict (cold metering of a decode step's weights) evicts exactly the tensors given; the native
    entry point rejects a null pointer and a negative size with a ValueError naming the argument."""
    import platform

    import torch

    from pykernels.harness import timing

    _C = pytest.importorskip("pykernels._C")
    t = torch.ones(1 << 16)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert timing.evict([t, torch.empty(0), t[::2]]) is x86
    assert torch.equal(t, torch.ones(1 << 16))  # evicting changes no value
    with pytest.raises(ValueError, match="argument 'ptr' is a null pointer"):
        _C.evict_cpu(0, 64)
    with pytest.raises(ValueError, match="argument 'nbytes'"):
        _C.evict_cpu(t.data_ptr(), -1)
    opts = timing.TimingOptions(budget_s=0.05, min_rounds=3, flush=True, evict=(t,))
    st = timing.time_round_robin_cpu([lambda: t.sum()], opts)[0]
    assert st.flush and st.rounds >= 3 and st.median_s > 0
