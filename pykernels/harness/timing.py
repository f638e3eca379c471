"""Timing of a zero-argument callable: CPU (perf_counter_ns, adaptive repetition) and CUDA (events, L2
flush, CUDA-graph batching, launch overhead measured on its own).

Everything the callable needs (allocation, compilation, autotuning) happens before it reaches this
module; the first calls here are warmup and are never counted. The statistics are pure functions of a
list of per-call times, so they are tested without any device.

The CUDA paths are written against torch.cuda's documented API but are **unverified on a GPU** until
someone runs tests/test_timing.py's cuda cases and the do_bench comparison (docs/harness.md).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# 1.2533 = sqrt(pi/2): the asymptotic standard error of the median of a normal sample is 1.2533 sigma/sqrt(n).
# sigma is estimated robustly from the interquartile range (IQR / 1.349 for a normal distribution), so a few
# slow outliers (an interrupt, another job on the same core) do not inflate it.
_MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2)
_IQR_TO_SIGMA = 1.349


@dataclass
class TimingOptions:
    """Knobs of one measurement. Defaults suit a 2-core CPU sweep: ~1 s per case at most."""

    warmup_s: float = 0.05          # run the callable back to back at least this long before measuring
    warmup_calls: int = 1           # ... and at least this many times (the caller made the first call already)
    budget_s: float = 1.0           # stop measuring after this much time ...
    rse_target: float = 0.01        # ... or as soon as the median's relative standard error is below this
    min_rounds: int = 5             # at least this many samples; 3 when one call is over budget_s / 5
    max_rounds: int = 10_000
    min_sample_s: float = 20e-6     # calls shorter than this are timed in batches (one sample = k calls)
    flush: bool | None = None       # write a buffer >= 2x the last-level cache between calls; None = the device's
                                    # default: no on CPU (warm caches), yes on CUDA (L2 flushed, docs/design.md)
    cuda_graph_below_s: float = 50e-6  # CUDA: kernels shorter than this are timed as a CUDA graph of k calls
    settle_s: float = 0.0           # CPU timer only (time_cuda ignores it): sleep this long before the warmup, so
                                    # that thread pools of whatever ran before (a BLAS spinning) are idle again
    evict: tuple | None = None      # CPU, with flush: instead of the buffer, evict exactly these tensors' bytes
                                    # from every cache level before each call (evict(); code and other data
                                    # stay cached, as in a model streaming its weights); () = evict nothing


# What the sweeps and validate wait before each CPU case (TimingOptions.settle_s): OpenBLAS spins ~0.1 s.
CPU_SETTLE_S = 0.2


@dataclass
class Stats:
    """Per-call time statistics in seconds."""

    median_s: float
    p20_s: float
    p80_s: float
    mean_s: float
    min_s: float
    max_s: float
    stddev_s: float
    cv: float               # coefficient of variation: stddev / mean
    rse_median: float       # relative standard error of the median (robust estimate, see _MEDIAN_SE_FACTOR)
    rounds: int             # samples taken
    calls_per_round: int = 1
    timer: str = ""
    stopped_by: str = ""    # "rse" (converged), "budget", "max_rounds"
    flush: bool = False
    launch_overhead_s: float | None = None  # CUDA: host wall time per call minus device time
    warmup_estimate_s: float | None = None  # CPU: the fastest warm-up call (the sanity check's yardstick)
    remeasured: int = 0     # times the samples were thrown away as implausible and taken again
    warning: str = ""       # why the samples are still implausible after the re-measurements ("" = none)
    samples: list[float] = field(default_factory=list, repr=False)

    def as_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list; q in [0, 100]."""
    if not sorted_xs:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def rse_of_median(samples: list[float]) -> float:
    """Relative standard error of the median: 1.2533 * (IQR / 1.349) / sqrt(n) / median.
    inf for fewer than 3 samples (no estimate yet); 0 when every sample is identical."""
    n = len(samples)
    if n < 3:
        return math.inf
    xs = sorted(samples)
    med = percentile(xs, 50)
    if med <= 0:
        return math.inf
    sigma = (percentile(xs, 75) - percentile(xs, 25)) / _IQR_TO_SIGMA
    return _MEDIAN_SE_FACTOR * sigma / math.sqrt(n) / med


def summarize(samples: list[float], *, calls_per_round: int = 1, timer: str = "", stopped_by: str = "",
              flush: bool = False, launch_overhead_s: float | None = None) -> Stats:
    """Statistics of per-call times (already divided by calls_per_round)."""
    if not samples:
        raise ValueError("no samples to summarize")
    if any(not math.isfinite(x) or x < 0 for x in samples):
        raise ValueError("samples must be finite and non-negative")
    xs = sorted(samples)
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return Stats(
        median_s=percentile(xs, 50), p20_s=percentile(xs, 20), p80_s=percentile(xs, 80), mean_s=mean,
        min_s=xs[0], max_s=xs[-1], stddev_s=sd, cv=sd / mean if mean > 0 else 0.0,
        rse_median=rse_of_median(xs), rounds=len(xs), calls_per_round=calls_per_round, timer=timer,
        stopped_by=stopped_by, flush=flush, launch_overhead_s=launch_overhead_s, samples=list(samples),
    )


def calls_per_sample(call_s: float, min_sample_s: float, cap: int = 10_000) -> int:
    """How many back-to-back calls make one sample of at least min_sample_s (1 for long calls): the
    timer's own overhead (~50-100 ns for perf_counter_ns, a few us for CUDA events) stays under ~1%."""
    if call_s <= 0:
        return cap
    return max(1, min(cap, math.ceil(min_sample_s / call_s * (1 - 1e-9))))  # 1e-9: float noise


def should_stop(samples: list[float], elapsed_s: float, opts: TimingOptions) -> str:
    """'' to keep going, else why the measurement stops: 'rse', 'budget' or 'max_rounds'."""
    n = len(samples)
    if n >= opts.max_rounds:
        return "max_rounds"
    if n < opts.min_rounds:
        return ""
    if rse_of_median(samples) <= opts.rse_target:
        return "rse"
    if elapsed_s >= opts.budget_s:
        return "budget"
    return ""


def evict(tensors) -> bool:
    """Evicts the bytes of each CPU tensor's storage from every cache level (clflush per line, native
    `_C.evict_cpu`); other tensors and the code stay where they are. False when it cannot (no native module,
    not x86-64): the caller then falls back to flushing the whole cache with a buffer."""
    try:
        from .. import _C
    except ImportError:
        return False
    ok = True
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        st = t.untyped_storage()
        ok = _C.evict_cpu(st.data_ptr(), st.nbytes()) and ok
    return ok


def _evicts(opts: TimingOptions) -> bool:
    """opts asks for cold calls by evicting given tensors, and this machine can (checked once per options)."""
    return bool(opts.flush) and opts.evict is not None and (not opts.evict or evict(opts.evict))


def flush_size(cache_bytes: int, factor: int = 2, minimum: int = 4 << 20) -> int:
    """Bytes of the buffer written between calls to evict a cache of `cache_bytes`: at least twice its
    size (docs/design.md), rounded up to a whole MiB, never below `minimum`."""
    if cache_bytes < 0:
        raise ValueError("cache size must be non-negative")
    n = max(minimum, factor * cache_bytes)
    return -(-n // (1 << 20)) * (1 << 20)


def cpu_caches() -> dict:
    """{'l1d': bytes, 'l2': bytes, 'l3': bytes} of cpu0's data/unified caches from sysfs (Linux); levels that
    sysfs does not report are left out."""
    out = {}
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            txt = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
        try:
            size = int(txt.rstrip("KkMmGg")) * mult
        except ValueError:
            continue
        if kind in ("Data", "Unified"):
            out["l1d" if level == "1" else f"l{level}"] = size
    return out


def cpu_llc_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's largest cache from sysfs (Linux), else `default`."""
    return max(cpu_caches().values(), default=0) or default


def _adapt_min_rounds(opts: TimingOptions, call_s: float) -> TimingOptions:
    """A call so long that min_rounds of them overrun the budget gets 3 rounds (the fewest that give a
    p20..p80 range) instead of min_rounds."""
    if opts.min_rounds > 3 and call_s * opts.min_rounds > opts.budget_s:
        return replace(opts, min_rounds=3)
    return opts


# ---------------------------------------------------------------------------------------------------
# CPU


# Sample sanity (CPU): on a shared machine an OpenMP thread descheduled for a whole measurement looks like a
# stable, slow kernel (seen: 16.0 ms +- 0.02 for a case that takes 8.7 us). Samples whose median is this many
# times the fastest warm-up call, or that fall into two clusters, are measured again, at most this many times.
SANITY_RATIO = 3.0
SANITY_RETRIES = 2


def bimodal(samples: list[float], gap: float = 1.5, share: float = 0.2) -> bool:
    """Two clusters: somewhere in the sorted samples the next one is `gap` times larger, with at least
    `share` of the samples on each side."""
    xs = sorted(samples)
    n = len(xs)
    lo = max(1, math.ceil(share * n))
    return n >= 5 and any(xs[i] > gap * xs[i - 1] > 0 for i in range(lo, n - lo + 1))


def sanity_problem(samples: list[float], warmup_estimate_s: float | None) -> str:
    """Why these samples look implausible ("" when they do not)."""
    if not samples:
        return ""
    med = statistics.median(samples)
    if warmup_estimate_s and med > SANITY_RATIO * warmup_estimate_s:
        return (f"median {med * 1e3:.4g} ms is {med / warmup_estimate_s:.1f}x the fastest warm-up call "
                f"({warmup_estimate_s * 1e3:.4g} ms)")
    if bimodal(samples):
        return "the samples fall into two clusters (bimodal)"
    return ""


def time_cpu(fn: Callable[[], object], opts: TimingOptions | None = None,
             clock: Callable[[], int] = time.perf_counter_ns) -> Stats:
    """perf_counter_ns around `fn`: warmup, then samples until the median's relative standard error is
    under opts.rse_target or opts.budget_s is spent (at least opts.min_rounds samples either way).
    Calls shorter than opts.min_sample_s are batched (k calls per sample); with opts.flush every sample is
    a single call preceded by writing a buffer of 2x the last-level cache (not timed).
    Samples that fail the sanity check (sanity_problem) are taken again up to SANITY_RETRIES times; if they
    still fail, the Stats carry the warning."""
    opts = opts or TimingOptions()
    if opts.settle_s > 0:
        time.sleep(opts.settle_s)
    # Warmup: at least warmup_calls calls and warmup_s seconds; also gives the per-call estimate.
    t_start = clock()
    calls = 0
    best = math.inf
    while calls < opts.warmup_calls or (clock() - t_start) * 1e-9 < opts.warmup_s:
        t0 = clock()
        fn()
        t_last = (clock() - t0) * 1e-9
        best = min(best, t_last)
        calls += 1
        if calls > 1000 and (clock() - t_start) * 1e-9 >= opts.warmup_s:
            break
    # A flushed (cold) sample is legitimately slower than a warm warm-up call: only the bimodality check.
    estimate = None if opts.flush else best
    remeasured = 0
    while True:
        st = _measure_cpu(fn, opts, clock, t_last)
        why = sanity_problem(st.samples, estimate)
        if not why or remeasured >= SANITY_RETRIES:
            break
        remeasured += 1
    st.warmup_estimate_s = best
    st.remeasured = remeasured
    st.warning = why
    return st


def _measure_cpu(fn, opts: TimingOptions, clock, t_last: float) -> Stats:
    """One set of samples of `fn` (see time_cpu); t_last: a warm call's duration, for the batch size."""
    flush_buf = None
    by_evict = _evicts(opts)
    if opts.flush:
        import torch

        if not by_evict:
            flush_buf = torch.empty(flush_size(cpu_llc_bytes()) // 4, dtype=torch.float32)
        k = 1
    else:
        k = calls_per_sample(t_last, opts.min_sample_s)
    opts = _adapt_min_rounds(opts, t_last)
    samples: list[float] = []
    t_begin = clock()
    stop = ""
    while not stop:
        if flush_buf is not None:
            flush_buf.fill_(float(len(samples)))
        elif by_evict:
            evict(opts.evict)
        t0 = clock()
        for _ in range(k):
            fn()
        samples.append((clock() - t0) * 1e-9 / k)
        stop = should_stop(samples, (clock() - t_begin) * 1e-9, opts)
    return summarize(samples, calls_per_round=k, timer="cpu perf_counter_ns", stopped_by=stop, flush=bool(opts.flush))


def time_round_robin_cpu(fns: list[Callable[[], object]], opts: TimingOptions | None = None,
                         setups: list[Callable[[], object] | None] | None = None) -> list[Stats]:
    """Several callables timed in turns (one sample of each per round) so that a busy spell on a shared
    machine slows all of them alike; used by the probes that compare two things. setups[i] (optional), untimed,
    runs before fns[i]'s warm-up calls and before each of its samples: e.g. the setting fns[i] is timed under,
    when the callables share the object that holds it (`pykernels tune`). Warm (no flush / evict), a
    callable whose call is shorter than opts.min_sample_s is sampled as k back-to-back calls (calls_per_sample
    of its fastest warm-up call; short ones get 8 more warm-up calls), as time_cpu does: a single call of a
    few microseconds timed right after another backend's is mostly the timer and the other backend's threads
    (issue-6 table, Sapphire Rapids VM: a 0.8 us GEMM 32^3 read as 3.5 us, 0.3 us 16^3 as 10 us). Cold,
    every sample is one call after a flush."""
    opts = opts or TimingOptions()
    setups = list(setups or [None] * len(fns))
    if len(setups) != len(fns):
        raise ValueError(f"setups: one per callable or none, got {len(setups)} for {len(fns)}")
    last = []
    for f, setup in zip(fns, setups):
        if setup is not None:
            setup()
        t, n = math.inf, max(1, opts.warmup_calls)
        for i in range(n + 8):  # warm and short: 8 more calls, so that k comes from a warm call's time
            if i >= n and (opts.flush or t >= 100 * opts.min_sample_s):
                break
            t0 = time.perf_counter_ns()
            f()
            t = min(t, (time.perf_counter_ns() - t0) * 1e-9)
        last.append(t)
    # opts.flush (cold caches): a buffer of 2x the last-level cache is read (not timed) before every call,
    # so no call finds the previous one's data (the same inputs, read by the backend before it) in cache.
    # Read rather than written (as time_cpu does): the evicting lines stay clean, so the timed call pays
    # for its own misses and not for writing back the flush buffer, as in a model whose earlier layers'
    # weights (clean) are what fills the cache.
    # opts.evict (with flush): instead of the buffer, exactly those tensors are evicted before every call.
    flush_buf = None
    by_evict = _evicts(opts)
    if opts.flush and not by_evict:
        import torch

        flush_buf = torch.ones(flush_size(cpu_llc_bytes()) // 4, dtype=torch.float32)
    ks = [1 if opts.flush else calls_per_sample(t, opts.min_sample_s) for t in last]
    samples: list[list[float]] = [[] for _ in fns]
    t_begin = time.perf_counter()
    while True:
        for i, f in enumerate(fns):
            if setups[i] is not None:
                setups[i]()
            if flush_buf is not None:
                flush_buf.sum()
            elif by_evict:
                evict(opts.evict)
            k = ks[i]
            t0 = time.perf_counter_ns()
            for _ in range(k):
                f()
            samples[i].append((time.perf_counter_ns() - t0) * 1e-9 / k)
        stops = [should_stop(s, time.perf_counter() - t_begin, opts) for s in samples]
        if all(stops):
            break
    return [summarize(s, calls_per_round=k, timer="cpu perf_counter_ns, round-robin", stopped_by=st,
                      flush=bool(opts.flush)) for s, st, k in zip(samples, stops, ks)]


# ---------------------------------------------------------------------------------------------------
# CUDA (unverified on a GPU: see the module docstring)


def _torch_cuda():
    import torch

    return torch.cuda


def cuda_l2_bytes(device=None, cuda=None) -> int:
    """The device's L2 size as torch reports it (cudaDevAttrL2CacheSize); 50 MiB (H100) if unknown."""
    props = (cuda or _torch_cuda()).get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def graph_kernel_time(with_fn_s: float, flush_only_s: float, k: int) -> float:
    """Per-call kernel time from two graph replays: k x (flush + fn) and k x flush. Never negative."""
    if k < 1:
        raise ValueError("k must be >= 1")
    return max(0.0, (with_fn_s - flush_only_s) / k)


def launch_overhead(wall_per_call_s: float, device_per_call_s: float) -> float:
    """Host-side launch overhead: wall time per synchronised call minus device time; never negative."""
    return max(0.0, wall_per_call_s - device_per_call_s)


def _capture_graphs(fn, flush, k: int, dev, cuda) -> tuple:
    """(graph of k x (flush + fn), graph of k x flush) — or only the first when flush is None."""
    stream = cuda.Stream(dev)
    stream.wait_stream(cuda.current_stream(dev))
    g_fn = cuda.CUDAGraph()
    g_flush = cuda.CUDAGraph() if flush is not None else None
    with cuda.stream(stream):
        fn()  # one call on the capture stream before capture (allocator warmup)
        with cuda.graph(g_fn, stream=stream):
            for _ in range(k):
                if flush is not None:
                    flush()
                fn()
        if g_flush is not None:
            with cuda.graph(g_flush, stream=stream):
                for _ in range(k):
                    flush()
    cuda.current_stream(dev).wait_stream(stream)
    cuda.synchronize(dev)
    return (g_fn, g_flush) if g_flush is not None else (g_fn,)


def _torch_flush(nbytes: int, dev) -> Callable[[], object]:
    import torch

    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    return buf.zero_


def time_cuda(fn: Callable[[], object], opts: TimingOptions | None = None, device=None, *, cuda=None,
              make_flush: Callable | None = None) -> Stats:
    """CUDA events around each call, L2 flushed (a buffer of 2x the L2, zeroed) before each call, outside
    the events. Kernels shorter than opts.cuda_graph_below_s are captured k times in a CUDA graph (with
    the flush between them) and timed per replay; a second graph of the flushes alone is subtracted. The
    host-side launch overhead (synchronised wall time per eager call minus device time) is recorded on its
    own in launch_overhead_s. `cuda` (default torch.cuda) and `make_flush(nbytes, device) -> callable` are
    parameters so that the control flow and arithmetic are tested without a GPU (tests/test_timing.py)."""
    cuda = cuda or _torch_cuda()
    opts = opts or TimingOptions()
    dev = "cuda" if device is None else device
    cuda.synchronize(dev)
    flush_on = True if opts.flush is None else opts.flush
    flush_fn = (make_flush or _torch_flush)(flush_size(cuda_l2_bytes(dev, cuda)), dev) if flush_on else None

    def flush():
        if flush_fn is not None:
            flush_fn()

    # Warmup and a per-call estimate of device time.
    t_end = time.perf_counter() + opts.warmup_s
    n = 0
    while n < opts.warmup_calls or time.perf_counter() < t_end:
        fn()
        n += 1
    cuda.synchronize(dev)
    s, e = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        fn()
    e.record()
    e.synchronize()
    est = s.elapsed_time(e) * 1e-3 / 5
    opts = _adapt_min_rounds(opts, est)

    # Host wall time per call, synchronised each time: what a caller that waits for the result sees.
    walls = []
    for _ in range(max(5, min(50, int(0.05 / max(est, 1e-6))))):
        t0 = time.perf_counter_ns()
        fn()
        cuda.synchronize(dev)
        walls.append((time.perf_counter_ns() - t0) * 1e-9)
    wall = statistics.median(walls)

    graphs, note = None, ""
    if est < opts.cuda_graph_below_s:
        k = calls_per_sample(est, 1e-3, cap=1000)  # ~1 ms of kernels per replay
        try:
            graphs = _capture_graphs(fn, flush if flush_fn is not None else None, k, dev, cuda)
        except Exception as e:  # noqa: BLE001 - a callable that cannot be captured (host sync, ...) is timed per call
            note = f" (CUDA graph capture failed: {type(e).__name__}; launch overhead included)"
            cuda.synchronize(dev)
    samples: list[float] = []
    t_begin = time.perf_counter()
    stop = ""
    if graphs is not None:
        while not stop:
            times = []
            for g in graphs:
                s.record()
                g.replay()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) * 1e-3)
            samples.append(graph_kernel_time(times[0], times[1], k) if len(times) == 2 else times[0] / k)
            stop = should_stop(samples, time.perf_counter() - t_begin, opts)
        timer = f"cuda events, CUDA graph of {k} calls" + (" minus a graph of the flushes" if len(graphs) == 2 else "")
    else:
        k = 1
        while not stop:
            flush()
            s.record()
            fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1e-3)
            stop = should_stop(samples, time.perf_counter() - t_begin, opts)
        timer = "cuda events per call" + note
    med = statistics.median(samples)
    return summarize(samples, calls_per_round=k, timer=timer, stopped_by=stop, flush=flush_fn is not None,
                     launch_overhead_s=launch_overhead(wall, med))


def time_callable(fn: Callable[[], object], device: str = "cpu", opts: TimingOptions | None = None) -> Stats:
    """Dispatch on the device type of the inputs: 'cuda...' -> time_cuda, anything else -> time_cpu."""
    if str(device).startswith("cuda"):
        return time_cuda(fn, opts, device=device)
    return time_cpu(fn, opts)
