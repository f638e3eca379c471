"""One kernel problem timed on one backend with the harness's timer, with its throughput and roofline
fraction. It sits above timing (the timer) and device (the peaks) so that neither imports the other's
callers: device -> timing is the only edge between them."""

from __future__ import annotations

import time

from .. import ops
from ..kernels import dtype_name, dtype_of
from . import device as devmod
from . import results
from .timing import CPU_SETTLE_S, TimingOptions, cpu_caches, time_callable


def measure_case(problem, dtype: str, backend: str, device: str = "cpu", *, inputs: dict,
                 budget_s: float = 2.0) -> dict:
    """Time one kernel problem on one backend with the harness's timer (what `pykernels validate` uses for
    its performance section): prepared through the public API (validation, compilation and the first call
    happen before timing), then throughput and % of the roofline bound from the device's measured peaks
    (cached per machine; measured once when missing)."""
    dtype = dtype_name(dtype_of(dtype))  # a name or a torch.dtype
    t_prepare = time.perf_counter()
    fn = ops.prepare(problem.family, backend=backend, **inputs, **problem.call_kwargs())
    prepare_s = time.perf_counter() - t_prepare  # one-off (the backend's prepare hook), recorded beside the result
    fn()  # compilation / autotuning / lazy initialisation: never timed
    stats = time_callable(fn, device, TimingOptions(budget_s=budget_s, settle_s=CPU_SETTLE_S))
    flops, nbytes = problem.flops(), problem.bytes(dtype_of(dtype))
    pk = devmod.peaks(device, [dtype])
    rates = results.throughput(flops, nbytes, stats.median_s)
    cache = results.warm_cache_level(device, nbytes, stats.as_dict(), cpu_caches() if device == "cpu" else None)
    frac = results.roofline_fraction(flops, nbytes, stats.median_s, devmod.peak_flops(pk, dtype),
                                     devmod.peak_bandwidth(pk), cache=cache)
    return {"median_s": stats.median_s, "p20_s": stats.p20_s, "p80_s": stats.p80_s, "cv": stats.cv,
            "rounds": stats.rounds, "tflops": rates["tflops"], "gbps": rates["gbps"],
            "pct_of_peak": frac["pct_roofline"], "bound": frac["bound"], "prepare_s": prepare_s}
