"""Measure exactly a model's kernel problems, without the pytest sweep: each distinct problem once per
(backend, dtype), on the CPU the backends timed in turns (one call of each per round) so that the ratios
between them come from the same seconds of a shared machine; then, where a meter exists, energy per call.
Writes a pytest-benchmark-shaped JSON file that `pykernels tokens` (and the other reports) read.

Timing is the harness's (pykernels/harness/timing.py); the device fingerprint is pykernels/harness/device.py's.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import ops
from ..backends import registry
from ..harness import device as _device
from ..harness import results, timing
from ..kernels import dtype_of
from ..kernels._common import dtype_name
from . import energy, stepops

# The float64 reference of a problem costs ~FLOPs / 20 GFLOP/s on this 2-core CPU: checking every output
# of ref-7b-2k's prefill GEMMs (up to 370 GFLOP) would take minutes. Above this many FLOPs the output is
# not checked (recorded as checked: false) unless the caller insists.
CHECK_MAX_FLOPS = 2e10
# How "cold" is made (recorded): the decode step's weights and KV cache evicted before each call.
COLD_METHOD = "evict operands (clflush of the weights / KV cache; activations and code stay cached)"


# Operands a decode step finds in cache all the same: the activation it was just handed (a GEMM's `a`, the
# query of decode). Everything else a decode-step kernel reads (weights, the KV cache) is evicted before
# each timed call when metering cold.
HOT_OPERANDS = ("a", "q", "context_lens", "block_table")


def cold_operands(inputs: dict) -> tuple:
    """The tensors of a problem's inputs that a decode step reads from memory (see HOT_OPERANDS)."""
    return tuple(v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in HOT_OPERANDS)


def time_cases(fns: list, *, budget_s: float, device: str, cold: bool = False, evict: tuple | None = None
               ) -> list[dict]:
    """Stats (timing.Stats as dicts) of each zero-argument callable with the harness's timer. On the CPU the
    backends are timed in turns (timing.time_round_robin_cpu: one call of each per round) so that a busy
    spell on a shared machine slows every backend's samples alike and the ratios hold; on a GPU each is
    timed alone with CUDA events, L2 flush and graph batching (timing.time_callable)."""
    # cold: before every call, the `evict` tensors are evicted from the caches (CPU: timing.evict; code, the
    # activations and the rest stay cached, as in a step that streams its weights), or, without `evict` (and
    # on a GPU), the whole cache is flushed with a buffer (timing.time_round_robin_cpu / time_callable)
    opts = timing.TimingOptions(budget_s=budget_s, min_rounds=3, flush=True if cold else None,
                                evict=evict if cold else None)
    if device.startswith("cuda"):
        return [timing.time_callable(f, device, opts).as_dict() for f in fns]
    return [st.as_dict() for st in timing.time_round_robin_cpu(fns, opts)]


def _energy_per_call(fn, meter, *, seconds: float, device: str) -> dict:
    """Average power and energy per call while `fn` runs back to back for about `seconds`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls = 0
    meter.start()
    t_end = time.perf_counter() + seconds
    while calls < 3 or time.perf_counter() < t_end:
        fn()
        calls += 1
    sync()
    j, s = meter.stop()
    return {"power_w": j / s, "energy_j_per_call": j / calls, "power_source": meter.source}


def _record(problem, backend, dtype, device, fp: dict, stats: dict, extra: dict) -> dict:
    """One pytest-benchmark entry whose extra_info is the harness's record (results.make_record), so that
    `pykernels report` reads these files too, plus the energy fields of this module."""
    extra = dict(extra)
    checked = extra.pop("checked")
    ex = results.make_record(
        problem=problem,
        backend_name=backend.name,
        tier=backend.tier,
        device=device,
        device_name=_device.device_label(fp),
        machine_id=fp.get("id", ""),
        dtype=dtype_name(dtype),
        stats=stats,
        max_error=extra.pop("rel_error", None),
        tolerance=extra.pop("tolerance", None),
        ok=extra.pop("ok", None),
        sweep="tokens",
        checked="full" if checked else "none (float64 reference too costly at this size)",
    )
    ex.update(extra)
    med = stats["median_s"]
    case = f"{backend.name}-{dtype_name(dtype)}-{problem.label()}"
    return {
        "group": problem.family,
        "name": f"tokens[{problem.family}-{case}]",
        "fullname": f"pykernels.tokens_measure::{problem.family}[{case}]",
        "params": {"backend": backend.name, "dtype": dtype_name(dtype), "shape": problem.label()},
        "stats": {
            "min": stats.get("min_s", med),
            "max": stats.get("max_s", med),
            "mean": stats.get("mean_s", med),
            "stddev": stats.get("stddev_s", 0.0),
            "median": med,
            "q1": stats["p20_s"],
            "q3": stats["p80_s"],
            "iqr": stats["p80_s"] - stats["p20_s"],
            "rounds": stats["rounds"],
            "iterations": 1,
            "ops": 1.0 / med,
            "outliers": "",
            "ld15iqr": stats.get("min_s", med),
            "hd15iqr": stats.get("max_s", med),
            "iqr_outliers": 0,
            "stddev_outliers": 0,
            "total": med,
        },
        "options": {},
        "extra_info": ex,
    }


def measure(
    workload,
    *,
    backends: list[str],
    dtypes: list[str],
    device: str = "cpu",
    out: Path,
    budget_s: float = 1.0,
    check: bool = True,
    command: str = "",
    cold: bool = True,
    step_ops: bool = True,
    log=print,
    start=None,
) -> dict:
    """Time every distinct problem of `workload` on each backend and dtype; write and return the document.

    A backend that does not support a case gets no record (the report shows it incomplete) and the reason
    is printed and kept in the file's `skipped` list. A wrong output is recorded ok: false (never ranked).

    cold (default): the kernels of a decode step are timed with their weights and KV cache evicted from
    every cache level before every call (timing.evict; where that is impossible, a buffer of 2x the
    last-level cache is read instead), as in a model that streams each layer's weights and KV cache from
    memory once per step, with the activations and the code still cached; prefill kernels stay warm (their
    weights are reused by P rows). Each record says which (`cold`, `cold_method`). step_ops: also time the rest of a step (tokens/stepops.py) with torch, per dtype."""
    bes = [registry.get(b) for b in backends]
    meter, meter_reason = energy.meter_for(device)
    benches, skipped = [], []
    t_start = time.perf_counter()
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    fp = _device.fingerprint(device)
    total = len(dtypes) * len(workload.problems())
    decode_problems = {c.problem for c in workload.decode.calls}
    rest = []
    for dt_name in dtypes:
        dtype = dtype_of(dt_name)
        for prob in workload.problems():
            if start:  # live progress: which problem, how many are left
                start(f"{dt_name} {prob.family} {prob.label()}", total)
            inputs = prob.make_inputs(dtype, device=device, seed=0)
            exp = None
            if check and prob.flops() <= CHECK_MAX_FLOPS:
                from ..harness import verify

                exp = verify.expected(prob, inputs)
            cases = []  # (backend, callable, extra)
            for be in bes:
                reason = be.supports(prob.family, device.split(":")[0], dtype, **prob.params())
                if reason:
                    skipped.append(
                        {"backend": be.name, "dtype": dt_name, "problem": prob.label(), "reason": reason}
                    )
                    log(f"  skip {be.name:14s} {prob.family:9s} {prob.label()}: {reason}")
                    continue
                fn = ops.prepare(prob.family, backend=be, **inputs, **prob.call_kwargs())
                out_t = fn()  # first call: compilation / autotuning happen here, outside the timing
                extra = {"checked": exp is not None}
                if exp is not None:
                    err, ok = exp.check(out_t)
                    extra.update(rel_error=err, tolerance=exp.tolerance, ok=ok)
                cases.append((be, fn, extra))
            if not cases:
                continue
            is_cold = cold and prob in decode_problems
            all_stats = time_cases([c[1] for c in cases], budget_s=budget_s * len(cases), device=device,
                                   cold=is_cold, evict=cold_operands(inputs))
            for (be, fn, extra), stats in zip(cases, all_stats):
                extra["cold"] = is_cold
                if is_cold:
                    extra["cold_method"] = COLD_METHOD
                if meter is not None:
                    extra.update(_energy_per_call(fn, meter, seconds=min(budget_s, 1.0), device=device))
                else:
                    extra["power_reason"] = meter_reason
                if exp is not None and extra["ok"]:
                    err, ok = exp.check(fn())  # the timed callable still gives the right answer
                    extra.update(rel_error=max(err, extra["rel_error"]), ok=ok)
                benches.append(_record(prob, be, dtype, device, fp, stats, extra))
                flag = "" if extra.get("ok", True) else "  WRONG OUTPUT"
                log(
                    f"  {be.name:14s} {dt_name:8s} {prob.family:9s} {prob.label():34s} "
                    f"{stats['median_s'] * 1e3:10.4g} ms  ({stats['rounds']} rounds, "
                    f"cv {stats['cv']:.2f}{', cold' if is_cold else ''}){flag}"
                )
            del inputs, exp, cases
        if step_ops:
            rest += measure_step_ops(workload, dtype, device=device, budget_s=budget_s, cold=cold, log=log)
    doc = {
        "machine_info": {
            "node": platform.node(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "python_version": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": fp,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "energy": meter.source if meter else f"not available: {meter_reason}",
        },
        "commit_info": {},
        "benchmarks": benches,
        "datetime": datetime.now(timezone.utc).isoformat(),
        "version": "pykernels.tokens_measure",
        "pykernels_tokens": {
            "model": workload.model.to_dict(),
            "prompt": workload.prompt,
            "context": workload.context,
            "batch": workload.batch,
            "fused": workload.fused,
            "threads": torch.get_num_threads(),
            "dtypes": list(dtypes),
            "backends": list(backends),
            "cold": bool(cold),  # decode-step kernels timed with cold caches
            "cold_method": COLD_METHOD if cold else None,
            "step_ops": rest,
            "command": command,
            "skipped": skipped,
            "wall_s": time.perf_counter() - t_start,
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def measure_step_ops(workload, dtype, *, device: str = "cpu", budget_s: float = 1.0, cold: bool = True,
                     log=print) -> list[dict]:
    """Times the rest of a step (stepops.step_ops) with torch eager ops, one row each; decode rows cold
    when `cold`: what a step reads from memory (a norm's weight, the KV cache of an append, the embedding
    table) is evicted before each call, while the activations, just written by the previous op, and the
    eager stack's code stay cached."""
    out = []
    extra, total = stepops.dispatch_ops_per_layer(workload, dtype, device)
    for op in stepops.step_ops(workload):
        fn = stepops.build(op, workload, dtype, device, dispatch_ops=extra)
        fn()
        is_cold = cold and op.phase == "decode"
        # what the op reads from memory in a step (stepops.build: its weight, the KV cache); () = nothing
        st = time_cases([fn], budget_s=budget_s, device=device, cold=is_cold,
                        evict=tuple(getattr(fn, "cold_operands", ())))[0]
        out.append({"phase": op.phase, "name": op.name, "count": op.count, "shape": op.shape,
                    "dtype": dtype_name(dtype), "device": device, "median_s": st["median_s"],
                    "min_s": st.get("min_s", st["median_s"]),
                    "p20_s": st["p20_s"], "p80_s": st["p80_s"], "rounds": st["rounds"], "cold": is_cold,
                    **({"ops_per_layer": extra, "layer_ops": total} if op.name == "dispatch" else {})})
        log(f"  {'torch ops':14s} {dtype_name(dtype):8s} {op.phase:9s} {op.name:34s} "
            f"{st['median_s'] * 1e3:10.4g} ms x {op.count}{'  (cold)' if is_cold else ''}")
    return out
