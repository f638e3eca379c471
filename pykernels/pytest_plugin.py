"""pytest plugin: the benchmark sweeps of pykernels/bench/. Opt-in: nothing is loaded into a pytest session
that does not ask for it (no pytest11 entry point), so installing pykernels never changes another project's
tests; every option but the entry word --benchmark carries the prefix --pk- so that it cannot collide with a
project's own (--device ...).

    pytest --benchmark [--pk-sweep quick] ...                                    (in a clone of the repository)
    pykernels bench [--sweep quick] [--backend NAME]... [--json out.json]      (anywhere: runs pytest for you)
    pytest -p pykernels.pytest_plugin --pyargs pykernels.bench --benchmark [--pk-sweep quick|full|smoke]
           [--pk-backend NAME]... [--pk-kernel FAMILY]... [--pk-dtype DT]... [--pk-shape M=..,N=..,K=..]...
           [--benchmark-json out.json] [--pk-resume]

- `--benchmark` (= `--pk-bench`): only the benchmark cases run, timed by pykernels.harness.timing on the chosen device (the GPU
  when there is one); default sweep `quick`. Each case's output after timing is checked against the float64
  reference: a wrong answer fails the case and is recorded with ok=false, never ranked.
- without it: every bench case of the `smoke` sweep (tiny shapes) runs once, untimed, output checked.
- pytest-benchmark stores and compares: our timer's per-call samples are handed to its `benchmark` fixture,
  our fields go to `extra_info`, the device fingerprint and measured peaks to `machine_info`.
- a journal (JSON lines) gets each case the moment it finishes; `--pk-resume` replays the cases already in it.
- a timed run that measured nothing exits non-zero and says why.

A bench function is marked `@pytest.mark.pykernels_bench("gemm")` and takes the fixtures `kernel_case`
(parametrized here from the sweep) and `kernel_bench` (runs it): see pykernels/bench/bench_gemm.py.
"""

from __future__ import annotations

import gc
import math
import re
import time

import pytest

FAMILIES = ("gemm", "attention", "decode")
SWEEP_NAMES = ("smoke", "small", "quick", "full")
NEVER_TIMED = {"triton_interpret": "correctness only (Triton's interpreter): never timed, never in speedup tables"}
SWEEP_BUDGET_S = {"smoke": 0.2, "small": 0.3, "quick": 0.5, "full": 1.5}
# Checking an output needs its float64 reference: ~FLOPs / 30 GFLOP/s on the 2-core CPU. Above this many
# FLOPs (or bytes) the check runs on a slice (64 rows of a GEMM, one KV-head group of attention, 2 sequences of a
# decode), which still catches a wrong kernel; the record says checked="slice".
FULL_CHECK_MAX_FLOPS = 2e10
FULL_CHECK_MAX_BYTES = 256 << 20  # and above this many bytes of inputs (the reference holds them in float64)

_STATE = pytest.StashKey[dict]()
# A timed case (first call, compilation, timing, checks) that takes longer than this is a hang.
DEFAULT_CASE_TIMEOUT_S = 900.0
FAILED_STATUSES = ("crashed", "hung")


# ---------------------------------------------------------------------------------------------------
# options and configuration


def pytest_addoption(parser):
    g = parser.getgroup("pykernels", "pykernels benchmark sweeps (all options start with --pk-)")
    # --benchmark: the entry word users know (pytest-benchmark registers only --benchmark-*); the plugin is
    # opt-in, so it never reaches a project that did not ask for it.
    g.addoption("--pk-bench", "--benchmark", action="store_true", default=False,
                help="run only the benchmark sweeps, timed (default sweep: quick); without it every bench case "
                     "runs once untimed (smoke sweep) with its output checked")
    g.addoption("--pk-sweep", default=None, choices=SWEEP_NAMES,
                help="shape sweep: smoke (tiny; default without --pk-bench), quick (default with --pk-bench, "
                     "< 5 min on a 2-core CPU), full (quick + the LLM shapes of ref-7b-2k)")
    g.addoption("--pk-shape", action="append", default=[], metavar="K=V,...",
                help="instead of --pk-sweep: this shape (repeatable): M=..,N=..,K=.. (gemm); "
                     "B=..,Hq=..,Hkv=..,S=..,D=..[,causal=1] (attention); "
                     "B=..,Hq=..,Hkv=..,L=..,D=..[,paged=1,block_size=16,ragged=1] (decode)")
    g.addoption("--pk-model", default=None, metavar="NAME",
                help="instead of --pk-sweep: exactly the kernel shapes one prefill and one decode step of this "
                     "model run (built-in: ref-7b-2k, ref-8b-gqa, tiny; or a model JSON file); see `pykernels tokens`")
    g.addoption("--pk-model-prompt", type=int, default=None, metavar="P", help="with --pk-model: prompt tokens")
    g.addoption("--pk-model-context", type=int, default=None, metavar="L", help="with --pk-model: decode context")
    g.addoption("--pk-model-batch", type=int, default=1, metavar="B", help="with --pk-model: decode batch (default 1)")
    g.addoption("--pk-backend", action="append", default=[], metavar="NAME",
                help="benchmark only this backend (repeatable); default: all registered except triton_interpret")
    g.addoption("--pk-kernel", action="append", default=[], choices=FAMILIES, help="only this family (repeatable)")
    g.addoption("--pk-dtype", action="append", default=[], metavar="DTYPE",
                help="only this dtype (repeatable): float32, bfloat16, float16")
    g.addoption("--pk-device", default=None, help="device type to run on (default: cuda when available, else cpu)")
    g.addoption("--pk-resume", action="store_true", default=False,
                help="replay the cases already in the journal instead of measuring them again")
    g.addoption("--pk-journal", default=None, metavar="PATH",
                help="journal file (JSON lines; default ~/.cache/pykernels/journal-<machine>-<sweep>.jsonl)")
    g.addoption("--pk-time-budget", type=float, default=None, metavar="S",
                help="seconds of timing per case (default by sweep: quick 0.5, full 1.5)")
    g.addoption("--pk-cold-cache", action="store_true", default=False,
                help="flush the caches between timed calls (CPU: a buffer of 2x the LLC; CUDA always flushes L2)")
    g.addoption("--pk-refresh-peaks", action="store_true", default=False,
                help="measure the device's peaks again instead of using the per-machine cache")
    g.addoption("--pk-threads", type=int, default=None, metavar="N",
                help="run on N threads: torch, the BLAS/OpenMP pools (threadpoolctl) and the native kernels; "
                     "the threads and CPU affinity used are recorded either way")
    g.addoption("--pk-case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT_S, metavar="S",
                help=f"seconds before a timed case counts as hung and fails (default {DEFAULT_CASE_TIMEOUT_S:g}; 0: "
                     "no limit); a hang that cannot be interrupted ends the process after as long again, recorded "
                     "as hung in the journal for --pk-resume")
    g.addoption("--pk-retry-crashed", action="store_true", default=False,
                help="with --pk-resume: run again the cases an earlier run recorded as crashed or hung")
    g.addoption("--pk-benchmark-table", action="store_true", default=False,
                help="also print pytest-benchmark's own table at the end of a timed run (hidden by default: the "
                     "pykernels table has the same cases; shown anyway with --benchmark-compare)")
    g.addoption("--pk-no-progress", action="store_true", default=False,
                help="no live progress line per case in a timed run (pytest's own dots instead)")


def _timing(config) -> bool:
    """Timed: --pk-bench, or pytest-benchmark's own --benchmark-enable / --benchmark-only (which would
    otherwise skip every case: ours reach the benchmark fixture through kernel_bench)."""
    return bool(config.getoption("pk_bench") or config.getoption("benchmark_enable", False)
                or config.getoption("benchmark_only", False))


@pytest.hookimpl(trylast=True)  # after the conftests' pytest_configure (which may register backends)
def pytest_configure(config):
    config.addinivalue_line("markers", "pykernels_bench(family): a pykernels benchmark function of that family "
                                       "(parametrized by the pykernels plugin)")
    chosen = [o for o in ("pk_sweep", "pk_model", "pk_shape") if config.getoption(o)]
    if len(chosen) > 1:
        raise pytest.UsageError(f"{' and '.join('--' + o.replace('_', '-') for o in chosen)} are exclusive: "
                                "each is a sweep of its own")
    if config.getoption("pk_model"):
        from .tokens import models

        try:
            models.derive(config.getoption("pk_model"), prompt=config.getoption("pk_model_prompt"),
                          context=config.getoption("pk_model_context"), batch=config.getoption("pk_model_batch"))
        except (models.ModelError, ValueError) as e:
            raise pytest.UsageError(f"--pk-model: {e}") from None
    if config.getoption("pk_shape"):
        from .harness.sweeps import shapes_sweep_name

        try:
            shapes_sweep_name(config.getoption("pk_shape"))
        except ValueError as e:
            raise pytest.UsageError(f"--pk-shape: {e}") from None
    # Usage errors now, with one line, not collection errors or silent skips later.
    if config.getoption("pk_backend"):
        _backend_names(config)
    if config.getoption("pk_dtype"):
        _dtypes(config)
    if config.getoption("pk_device"):
        _check_device(config.getoption("pk_device"))
    if config.getoption("pk_threads") is not None:
        from .harness.threads import pin_threads

        try:
            pin_threads(config.getoption("pk_threads"))
        except ValueError as e:
            raise pytest.UsageError(f"--pk-threads: {e}") from None
    if config.getoption("benchmark_histogram", None):
        try:
            import pygal  # noqa: F401
        except ImportError:
            raise pytest.UsageError("--benchmark-histogram needs pygal: pip install 'pytest-benchmark[histogram]' "
                                    "(or pykernels[plot])") from None
    _state(config)


def _state(config) -> dict:
    st = config.stash.get(_STATE, None)
    if st is None:  # created on first use: pytest-benchmark may ask for machine_info before our configure
        timing = _timing(config)
        sweep = config.getoption("pk_sweep") or ("quick" if timing else "smoke")
        if config.getoption("pk_shape"):
            from .harness.sweeps import shapes_sweep_name

            sweep = shapes_sweep_name(config.getoption("pk_shape"))
        elif config.getoption("pk_model"):
            from .harness.sweeps import model_sweep_name

            sweep = model_sweep_name(config.getoption("pk_model"), prompt=config.getoption("pk_model_prompt"),
                                     context=config.getoption("pk_model_context"), batch=config.getoption("pk_model_batch"))
        st = config.stash[_STATE] = {
            "timing": timing, "sweep": sweep, "records": [],
            "journal": None, "peaks": None, "fingerprint": None, "cases": {}, "expected": None, "skips": {},
            "started": time.time(), "failures": [], "reprobes": 0}
    return st


def _device(config) -> str:
    dev = config.getoption("pk_device")
    if dev:
        return dev
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(dev: str) -> None:
    from .harness.device import device_problem

    why = device_problem(dev)
    if why:
        raise pytest.UsageError(f"--pk-device: {why}")


def _backend_names(config) -> list[str]:
    from .backends import registry

    known = registry.all_backends()
    asked = config.getoption("pk_backend")
    if asked:
        unknown = [n for n in asked if n not in known]
        if unknown:
            raise pytest.UsageError(f"--pk-backend: unknown backend(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(sorted(known))}")
        return list(dict.fromkeys(asked))
    return [n for n in known if n not in NEVER_TIMED]


def _dtypes(config) -> list[str]:
    from .kernels import dtype_name, dtype_of

    out = []
    for d in config.getoption("pk_dtype"):
        try:
            out.append(dtype_name(dtype_of(d)))
        except ValueError as e:
            raise pytest.UsageError(f"--pk-dtype: {e}") from None
    return out


def pytest_generate_tests(metafunc):
    if "kernel_case" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("pykernels_bench")
    if mark is None or not mark.args or mark.args[0] not in FAMILIES:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a function using 'kernel_case' needs "
                                f"@pytest.mark.pykernels_bench(<one of {', '.join(FAMILIES)}>)")
    family = mark.args[0]
    from .harness import sweeps

    config = metafunc.config
    st = _state(config)
    kernels = config.getoption("pk_kernel")
    cases = [] if kernels and family not in kernels else sweeps.sweep(st["sweep"], family=family,
                                                                      dtypes=_dtypes(config))
    names = _backend_names(config)
    if st["sweep"] == "smoke" and not st["timing"]:
        pairs = _smoke_trim(cases, names)
    else:
        pairs = [(c, b) for c in cases for b in names]  # shape-major: one reference serves all backends
    ids = []
    for case, b in pairs:
        cid = f"{b}-{case.id()}"
        st["cases"][(family, cid)] = (case, b)
        ids.append(cid)
    if not ids:
        metafunc.parametrize("kernel_case", [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no {family} cases selected (sweep {st['sweep']}, --pk-kernel/--pk-dtype filters)"))], ids=["none"])
        return
    metafunc.parametrize("kernel_case", ids, ids=ids)


def _smoke_trim(cases, names):
    """Plain pytest: torch.compile costs seconds per shape, so it gets one shape per family and dtype; the
    other backends get every smoke shape. Returns (case, backend) pairs."""
    out = []
    seen_compile = set()
    for c in cases:
        for b in names:
            if b == "torch_compile":
                if (c.family, c.dtype) in seen_compile:
                    continue
                seen_compile.add((c.family, c.dtype))
            out.append((c, b))
    return out


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's, which skips items without its fixture
def pytest_collection_modifyitems(config, items):
    """With --pk-bench only the benchmark cases run (the tests have their own plain `pytest` run). Timed cases
    reach pytest-benchmark's `benchmark` fixture through kernel_bench; it is declared here so that its
    --benchmark-only keeps them."""
    if not _state(config)["timing"]:
        return
    keep, drop = [], []
    for it in items:
        (keep if it.get_closest_marker("pykernels_bench") else drop).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if config.pluginmanager.hasplugin("benchmark"):
        for it in keep:
            if "benchmark" not in it.fixturenames:
                it.fixturenames.append("benchmark")


def pytest_sessionfinish(session, exitstatus):
    """A timed run that measured no case is a failure, not a green run: say why and exit 1."""
    _end_of_run(session.config)
    st = session.config.stash.get(_STATE, None)
    if not st or not st["timing"] or st["records"] or exitstatus not in (0, pytest.ExitCode.NO_TESTS_COLLECTED):
        return
    reasons = st["skips"]
    why = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]) or \
        "no benchmark case was selected"
    st["nothing_measured"] = why
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------------------------
# running one case


def _journal(config):
    st = _state(config)
    if st["journal"] is None:
        from .harness import results

        fp = _fingerprint(config)
        path = config.getoption("pk_journal")
        if path is None:
            from .harness.device import cache_dir

            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", st["sweep"])  # a model sweep may name a file path
            if len(safe) > 100:  # many --shape options: a file name has at most 255 bytes; the hash keeps it unique
                import hashlib

                safe = f"{safe[:80]}-{hashlib.sha256(st['sweep'].encode()).hexdigest()[:16]}"
            path = cache_dir() / f"journal-{fp['type']}-{fp['id']}-{safe}.jsonl"
        st["journal"] = results.Journal(path, resume=config.getoption("pk_resume"))
    return st["journal"]


def _fingerprint(config) -> dict:
    st = _state(config)
    if st["fingerprint"] is None:
        from .harness import device

        st["fingerprint"] = device.fingerprint(_device(config))
    return st["fingerprint"]


# At most this many bandwidth probes again in one run (_past_bandwidth_peak).
_MAX_REPROBES = 4


def _past_bandwidth_peak(st: dict, ex: dict, pk: dict, fp: dict, device: str, remake) -> dict:
    """The record `ex`, or `remake()` after the bandwidth peak was raised. A memory-bound figure above the peak
    (a probe error) on a shared VM is most often a faster spell of its memory, whose bandwidth moves by up to 2x
    within minutes, than the one the peak was probed in: the probe runs again now, and a higher figure raises the
    peak (in `pk` and the machine's cache; never lowered) for this record and the rest of the run. A lower one
    leaves the record flagged."""
    if not (ex.get("probe_error") and ex.get("bound") == "memory") or st["reprobes"] >= _MAX_REPROBES:
        return ex
    from .harness import device as devmod

    st["reprobes"] += 1
    probe = devmod.peak_bandwidth_probe(device, fp, reps=3, budget_s=1.0)
    return remake() if devmod.raise_bandwidth_peak(pk, fp, probe) else ex


def _peaks(config) -> dict:
    """The device's peaks (cached per machine; measured when missing) and, once per run, the bandwidth probe
    measured afresh: its figure goes into every record, and raises the cached peak when higher."""
    st = _state(config)
    if st["peaks"] is None:
        from .harness import device, sweeps

        dtypes = sorted({c.dtype for c in sweeps.sweep(st["sweep"], dtypes=_dtypes(config))})
        fp = _fingerprint(config)
        pk = device.peaks(_device(config), dtypes, refresh=config.getoption("pk_refresh_peaks"), fp=fp)
        st["copy"] = device.bandwidth_probe(_device(config), budget_s=1.0)
        device.raise_bandwidth_peak(pk, fp, st["copy"])
        st["peaks"] = pk
    return st["peaks"]


def _slice_inputs(problem, inputs: dict) -> tuple[dict, callable]:
    """A cheap-to-check part of a large problem: (inputs of the part, out -> the matching part of out)."""
    import torch

    if problem.family == "gemm":
        idx = torch.linspace(0, problem.M - 1, steps=min(64, problem.M)).round().long().unique()
        return {"a": inputs["a"][idx.to(inputs["a"].device)].contiguous(), "b": inputs["b"]}, \
            (lambda out: out[idx.to(out.device)])
    if problem.family == "attention":
        g = problem.Hq // problem.Hkv
        sub = {"q": inputs["q"][:, :g].contiguous(), "k": inputs["k"][:, :1].contiguous(),
               "v": inputs["v"][:, :1].contiguous()}
        return sub, (lambda out: out[:, :g])
    nb = min(2, problem.B)
    sub = {"q": inputs["q"][:nb].contiguous(), "context_lens": inputs["context_lens"][:nb].contiguous()}
    if inputs.get("block_table") is None:
        sub.update(k_cache=inputs["k_cache"][:nb].contiguous(), v_cache=inputs["v_cache"][:nb].contiguous(),
                   block_table=None)
    else:
        sub.update(k_cache=inputs["k_cache"], v_cache=inputs["v_cache"],
                   block_table=inputs["block_table"][:nb].contiguous())
    return sub, (lambda out: out[:nb])


def _inputs_and_check(config, case, device: str, seed: int = 0):
    """Inputs and a checker for (problem, dtype, device, seed), cached for the next backend of the same shape
    (seed 0: the timed inputs; seed 1: the fresh inputs of the recheck after timing)."""
    from .harness import verify
    from .kernels import dtype_of

    st = _state(config)
    key = (case.problem, case.dtype, device)
    cached = st["expected"]
    if cached is not None and cached[0] == key and seed in cached[1]:
        return cached[1][seed]
    if cached is None or cached[0] != key:
        st["expected"] = cached = (key, {})
        gc.collect()
    inputs = case.problem.make_inputs(dtype_of(case.dtype), device=device, seed=seed)
    big = (case.problem.flops() > FULL_CHECK_MAX_FLOPS
           or case.problem.bytes(dtype_of(case.dtype)) > FULL_CHECK_MAX_BYTES)
    if big:
        sub, part = _slice_inputs(case.problem, inputs)
        exp = verify.expected(case.problem, sub)
        checker = (lambda out: exp.check(part(out))), exp, "slice"
    else:
        exp = verify.expected(case.problem, inputs)
        checker = exp.check, exp, "full"
    cached[1][seed] = (inputs, checker)
    return inputs, checker


def _benchmark_fixture(request):
    try:
        return request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:  # pytest-benchmark not installed: the journal still has everything
        return None


def _feed_benchmark(bm, samples: list[float], group: str, extra: dict) -> None:
    """Hand our timer's per-call samples to pytest-benchmark, which then owns storage, JSON and compare.
    (It has no public API for external samples; _make_stats + update is what benchmark.pedantic does.)"""
    if bm is None:
        return
    bm.group = group
    bm.extra_info.update(extra)
    bm._mode = "pykernels timer"  # marks the fixture as used (else pytest-benchmark warns at teardown)
    if bm.disabled:
        return
    stats = bm._make_stats(1)
    for s in samples:
        stats.update(s)


@pytest.fixture
def kernel_bench(request):
    """Callable(kernel_case): runs one case (timed with --pk-bench, once untimed otherwise)."""

    def run(case_id: str):
        _run_case(request, case_id)

    return run


def _skip_reason(name: str, case, device: str, timing: bool) -> str | None:
    from .backends import registry
    from .kernels import dtype_of

    b = registry.all_backends().get(name)
    if b is None:
        return f"backend {name!r} is not registered"
    if timing and name in NEVER_TIMED:
        return f"{name}: {NEVER_TIMED[name]}"
    info = registry.info(b)
    if not info.available:
        return f"backend {name!r} unavailable: {info.reason}"
    return b.supports(case.family, device.split(":")[0], dtype_of(case.dtype), **case.problem.params())


def _run_case(request, case_id: str) -> None:
    from .backends import registry

    config = request.config
    st = _state(config)
    family = request.node.get_closest_marker("pykernels_bench").args[0]
    case, name = st["cases"][(family, case_id)]
    device = _device(config)
    reason = _skip_reason(name, case, device, st["timing"])
    if reason:
        st["skips"][reason] = st["skips"].get(reason, 0) + 1  # for the line that says why nothing was measured
        pytest.skip(reason)
    key = f"{family}/{case_id}"
    group = f"{family} {case.dtype} {case.problem.label()}"

    backend = registry.get(name)
    ident = {"family": family, "backend": name, "tier": backend.tier, "device": device, "dtype": case.dtype,
             "shape": case.problem.label(), "params": case.problem.params(), "sweep": st["sweep"]}
    if not st["timing"]:
        _measure(request, family, case, name, backend, device, key, group)
        return

    journal = _journal(config)
    prev = journal.get(key) if config.getoption("pk_resume") else None
    if prev is not None and prev.get("status") == "measured":
        ex = dict(prev["extra_info"], resumed=True)
        st["records"].append(ex)
        _feed_benchmark(_benchmark_fixture(request), prev.get("samples") or [ex["median_s"]], group, ex)
        if ex.get("ok") is False:
            pytest.fail(f"(from the journal) {name} gave a wrong answer: {ex.get('max_error')}")
        return
    if prev is not None and prev.get("status") in ("started", *FAILED_STATUSES) \
            and not config.getoption("pk_retry_crashed"):
        # A 'started' entry with nothing after it: this case ended the process (segfault, abort, OOM kill, ...).
        status = prev["status"] if prev["status"] in FAILED_STATUSES else "crashed"
        reason = prev.get("reason") or ("the process died during this case in an earlier run (a 'started' entry in "
                                        "the journal and no result)")
        if prev["status"] == "started":
            journal.append(key, {**ident, "status": status, "reason": reason})
        _fail_case(st, ident, status, reason + " (from the journal; --pk-retry-crashed runs it again)", request)

    from .harness.watchdog import CaseHang, Watchdog

    timeout = config.getoption("pk_case_timeout")

    def hard_hang():
        journal.append(key, {**ident, "status": "hung", "reason": f"no answer within {timeout:g} s, and the case "
                                                                   "could not be interrupted: the process was ended"})

    _fingerprint(config), _peaks(config)  # once per run (probes): not the backend's time
    journal.append(key, {**ident, "status": "started", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    try:
        with Watchdog(timeout, hard_hang):
            _measure(request, family, case, name, backend, device, key, group)
    except CaseHang as e:
        journal.append(key, {**ident, "status": "hung", "reason": str(e)})
        _fail_case(st, ident, "hung", str(e), request)


def _fail_case(st, ident: dict, status: str, reason: str, request) -> None:
    """A case that crashed or hung: kept for the JSON (pykernels_failed) and the summary, and failed."""
    st["failures"].append({**ident, "status": status, "reason": reason})
    bm = _benchmark_fixture(request)
    if bm is not None:
        bm._mode = "pykernels timer"  # used, with no samples (else pytest-benchmark warns at teardown)
    pytest.fail(f"{ident['backend']} {ident['family']} {ident['dtype']} {ident['shape']}: {status}: {reason}",
                pytrace=False)


def _measure(request, family, case, name, backend, device, key, group) -> None:
    import pykernels as pk

    from .harness import results, timing

    config = request.config
    st = _state(config)
    inputs, (check, exp, checked) = _inputs_and_check(config, case, device)
    t_prepare = time.perf_counter()
    fn = pk.prepare(family, backend=name, **inputs, **case.problem.call_kwargs())
    prepare_s = time.perf_counter() - t_prepare  # validation + the backend's prepare hook: one-off, recorded
    out = fn()  # first call: compilation / autotuning / lazy init, never timed
    if not st["timing"]:
        err, ok = check(out)
        assert ok, (f"{name} {family} {case.dtype} {case.problem.label()}: relative error {err:.3g} > tolerance "
                    f"{exp.tolerance:.3g}")
        return

    budget = config.getoption("pk_time_budget") or SWEEP_BUDGET_S.get(st["sweep"], 1.0)
    # --cold-cache flushes on every device; without it the device default applies (CPU warm, CUDA L2 flushed)
    opts = timing.TimingOptions(budget_s=budget, flush=True if config.getoption("pk_cold_cache") else None,
                                settle_s=timing.CPU_SETTLE_S)
    last = [out]
    del out

    def timed():  # keeps the last timed call's output for the check (costs ~50 ns a call)
        last[0] = fn()

    t_case = time.perf_counter()
    stats = timing.time_callable(timed, device, opts)
    out = last.pop()  # the output of the last timed call: a fast wrong answer fails
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    err, ok = check(out)
    del out
    # The anti-cheat recheck: fresh random inputs of the same shape, one more call, checked too. A backend
    # that memoizes outputs by shape, or is right only on its first calls, fails here.
    fresh, (check2, exp2, _) = _inputs_and_check(config, case, device, seed=1)
    out = pk.prepare(family, backend=name, **fresh, **case.problem.call_kwargs())()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    err2, ok2 = check2(out)
    del out
    from .harness import device as devmod

    fp, pk_ = _fingerprint(config), _peaks(config)
    try:
        describe = backend.describe_call(family, inputs)
    except Exception as e:  # noqa: BLE001 - a describe failure must not lose the measurement
        describe = {"error": f"{type(e).__name__}: {e}"}
    def record() -> dict:
        return results.make_record(
            problem=case.problem, backend_name=name, tier=backend.tier, device=device,
            device_name=devmod.device_label(fp), machine_id=fp["id"], dtype=case.dtype, stats=stats.as_dict(),
            max_error=err, tolerance=exp.tolerance, ok=ok and ok2, peak_flops=devmod.peak_flops(pk_, case.dtype),
            peak_bw=devmod.peak_bandwidth(pk_), sweep=st["sweep"],
            vendor_ceiling_flops=devmod.vendor_ceiling(pk_, case.dtype), describe=describe,
            checked=f"{checked}+fresh", caches=fp.get("caches"))

    ex = _past_bandwidth_peak(st, record(), pk_, fp, device, record)
    ex["recheck_max_error"] = results._finite_or_none(err2)
    ex["recheck_ok"] = ok2
    ex["copy_bytes_per_s_this_run"] = st["copy"]["copy_bytes_per_s"]
    ex["read_bytes_per_s_this_run"] = st["copy"]["read_bytes_per_s"]
    ex["prepare_s"] = prepare_s
    _journal(config).append(key, {"status": "measured", "extra_info": ex, "samples": stats.samples,
                                  "timing_wall_s": round(time.perf_counter() - t_case, 3),
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    st["records"].append(ex)
    _feed_benchmark(_benchmark_fixture(request), stats.samples, group, ex)
    if not ok:
        pytest.fail(f"{name} {family} {case.dtype} {case.problem.label()}: wrong answer after timing: relative error "
                    f"{err:.3g} > tolerance {exp.tolerance:.3g} (recorded with ok=false, not ranked)")
    if not ok2:
        pytest.fail(f"{name} {family} {case.dtype} {case.problem.label()}: wrong answer on fresh inputs of the same "
                    f"shape after timing (memoized or first-call-only output?): relative error {err2:.3g} > "
                    f"tolerance {exp2.tolerance:.3g} (recorded with ok=false, not ranked)")


# ---------------------------------------------------------------------------------------------------
# pytest-benchmark hooks and the terminal summary


def pytest_benchmark_update_machine_info(config, machine_info):
    """The device fingerprint and measured peaks. Only what is stable between runs on one machine goes here:
    pytest-benchmark's --benchmark-compare warns when machine_info differs (the sweep is in extra_info)."""
    if not _timing(config):
        return
    from .harness.device import device_label

    fp = _fingerprint(config)
    from .harness.threads import state as thread_state

    machine_info["pykernels"] = {"device": {**fp, "label": device_label(fp)}, "peaks": _peaks(config),
                                 "threads": {**thread_state(), "requested": config.getoption("pk_threads")}}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Cases that crashed or hung have no timing, so pytest-benchmark has no entry for them: they are listed
    here, with their reason, so that the JSON (and `pykernels report`) shows them as failed."""
    st = config.stash.get(_STATE, None)
    if st and st["failures"]:
        output_json["pykernels_failed"] = list(st["failures"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    st = config.stash.get(_STATE, None)
    if not st or not st["timing"]:
        return
    for f in st["failures"]:
        terminalreporter.write_line(f"pykernels: {f['status'].upper()} {f['backend']} {f['family']} {f['dtype']} "
                                    f"{f['shape']}: {f['reason']}", red=True)
    if st.get("nothing_measured"):
        terminalreporter.write_line(f"pykernels: no case was measured ({st['nothing_measured']}); exit status 1",
                                    red=True, bold=True)
    if st["journal"] is not None:
        st["journal"].close()
        terminalreporter.write_line(f"pykernels journal: {st['journal'].path}")
    if not st["records"]:
        return
    from . import report
    from .harness import results

    recs = []
    for ex in st["records"]:
        try:
            recs.append(results.record_from(ex, None, ex.get("shape", "?")))
        except results.ResultFileError as e:
            terminalreporter.write_line(f"pykernels: cannot summarise a case: {e}")
    terminalreporter.write_sep("=", f"pykernels speedup table (sweep {st['sweep']}, "
                                    f"{math.ceil(time.time() - st['started'])} s)")
    terminalreporter.write(report.table_terminal(report.penalty_rows(recs),
                                                 color=bool(getattr(terminalreporter._tw, "hasmarkup", False))))
    pk_ = st["peaks"] or {}
    bw = (pk_.get("bandwidth") or {}).get("bytes_per_s")
    if bw:
        flops = ", ".join(f"{dt} {report.fmt_rate(v['flops_per_s'], 'FLOP/s')}"
                          for dt, v in sorted((pk_.get("flops") or {}).items()) if v)
        vc = ", ".join(f"{dt} {report.fmt_rate(v['flops_per_s'], 'FLOP/s')}"
                       for dt, v in sorted((pk_.get("vendor_ceiling") or {}).items()) if v)
        terminalreporter.write_line(f"measured peaks: bandwidth {report.fmt_rate(bw, 'B/s')}; hardware {flops}"
                                    + (f"; vendor ceiling {vc}" if vc else "") + f"  [cache {pk_.get('cache')}]")
    if st.get("copy"):
        terminalreporter.write_line(f"bandwidth probe of this run: copy {report.fmt_rate(st['copy']['copy_bytes_per_s'], 'B/s')}"
                                    f", read {report.fmt_rate(st['copy']['read_bytes_per_s'], 'B/s')}")


def pytest_unconfigure(config):
    if config.getoption("pk_threads", None) is not None:
        from .harness.threads import unpin_threads

        unpin_threads()  # an in-process run (pytester) leaves the thread counts as it found them
    st = config.stash.get(_STATE, None)
    if st and st["journal"] is not None:
        st["journal"].close()


# ---------------------------------------------------------------------------------------------------
# live progress of a timed sweep, and pytest-benchmark's duplicate table


def _end_of_run(config) -> None:
    """Clears the progress bar; hides pytest-benchmark's duplicate table."""
    st = config.stash.get(_STATE, None)
    if st and st.get("progress"):
        st["progress"].close()
    _hide_benchmark_table(config)


def _hide_benchmark_table(config) -> None:
    """pytest-benchmark prints its own ~230-column table of the same cases after ours; it has no hook to skip
    it, but its session's `quiet` flag is read only by that display (the JSON, the saving and
    --benchmark-compare-fail's check are unaffected). Kept with --pk-benchmark-table or --benchmark-compare."""
    st = config.stash.get(_STATE, None)
    bs = getattr(config, "_benchmarksession", None)
    if not st or not st["timing"] or not st["records"] or bs is None or not hasattr(bs, "quiet"):
        return
    if config.getoption("pk_benchmark_table") or config.getoption("benchmark_compare", None):
        return
    bs.quiet = True


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """A timed run (pytest's default or -q verbosity, not -v) announces each case: which one, how many are
    left, elapsed and estimated time left; a bar rewritten in place on a terminal, plain lines otherwise."""
    config = session.config
    st = config.stash.get(_STATE, None)
    if (st and st["timing"] and not config.option.collectonly
            and any(it.get_closest_marker("pykernels_bench") for it in session.items)):
        # The device's fingerprint and peaks (probes, seconds on a machine without a cached calibration) before
        # the first case starts, so that no case's clock (the fleet's per-case timeout, a watchdog) counts them.
        # If they fail here (e.g. a device this machine lacks), the first case meets the error and reports it.
        try:
            _fingerprint(config), _peaks(config)
        except Exception:  # noqa: BLE001, S110 - reported by the first case, which calls them again
            pass
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if (not st or not st["timing"] or tr is None or config.getoption("verbose") > 0
            or config.getoption("pk_no_progress")):
        return
    desc = {}
    for it in session.items:
        mark = it.get_closest_marker("pykernels_bench")
        cid = getattr(getattr(it, "callspec", None), "params", {}).get("kernel_case")
        if mark is None or (mark.args[0], cid) not in st["cases"]:
            continue
        case, backend = st["cases"][(mark.args[0], cid)]
        desc[it.nodeid] = f"{case.family} {case.dtype} {case.problem.label()} {backend}"
    if desc:
        st["progress"] = _LiveProgress(tr, desc)
        config.pluginmanager.register(st["progress"], "pykernels-progress")


class _LiveProgress:
    """Registered for one timed run: its hooks announce each case (pytest_runtest_logstart runs outside
    output capture, where pytest writes its own progress) and leave out pytest's per-test letters (., s, F),
    which would break the line; failures are still counted and listed by pytest, and noted as they happen."""

    def __init__(self, tr, desc: dict):
        from .tables import Progress

        self.tr, self.desc = tr, desc
        self._width_after = 0
        tty = bool(tr.isatty() if callable(tr.isatty) else tr.isatty) and bool(getattr(tr._tw, "hasmarkup", False))
        self.bar = Progress(len(desc), label="pykernels", tty=tty, write=self._write,
                            width=getattr(tr._tw, "fullwidth", 120))
        if hasattr(tr, "_show_progress_info"):  # pytest's "[ 42%]": ours says more (pytest 8-9 attribute)
            tr._show_progress_info = False

    def _write(self, text: str) -> None:
        if not self.bar.tty:  # a line of its own, left open so that pytest's file name is not repeated
            text = "\n" + text.rstrip("\n")
        else:  # the bar rewrites its own line; a line pytest wrote since (a file name) is kept above it
            now = getattr(self.tr._tw, "width_of_current_line", 0)
            if now and now != self._width_after:
                text = "\n" + text
        self.tr.write(text, flush=True)
        self._width_after = getattr(self.tr._tw, "width_of_current_line", 0)

    def close(self) -> None:
        self.bar.close()

    def pytest_runtest_logstart(self, nodeid, location):
        if nodeid in self.desc:
            self.bar.step(self.desc[nodeid])

    def pytest_report_teststatus(self, report, config):
        if report.nodeid not in self.desc:
            return None
        outcome = report.outcome
        if report.when in ("setup", "teardown") and outcome == "failed":
            outcome = "error"
        if report.failed:
            self.bar.note(f"{outcome.upper()} {report.nodeid}")
        if report.when != "call" and report.passed:
            return "", "", ""
        return outcome, "", outcome.upper()
