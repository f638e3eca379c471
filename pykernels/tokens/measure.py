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
# How "cold" is made (recorded). A decode-step kernel on the CPU rotates through copies of its weights / KV
# cache (ROTATE_METHOD); a prefill kernel (and a decode one on a GPU or where copies cannot be made) has its
# operands evicted before each call (COLD_METHOD).
COLD_METHOD = ("evict operands (clflush: decode, the weights / KV cache, activations stay cached; prefill, every "
               "operand; the code stays cached)")
ROTATE_METHOD = ("rotating copies of the weights / KV cache, {copies} copies, {mb:.0f} MB in all (2x the last-level "
                 "cache): each call streams them from memory, as a step of a model larger than the cache does")
MAX_COPIES = 512  # copies of one problem's cold operands at most (a small weight in a large step)
MAX_WINDOW_BYTES = 4 << 30  # the copies of one problem span at most this much (a CPU reporting a huge L3)


# Operands a decode step finds in cache all the same: the activation it was just handed (a GEMM's `a`, the
# query of decode). Everything else a decode-step kernel reads (weights, the KV cache) is evicted before
# each timed call when metering cold.
HOT_OPERANDS = ("a", "q", "context_lens", "block_table")


def cold_operands(inputs: dict, phase: str = "decode") -> tuple:
    """The tensors of a problem's inputs that a step reads from memory: in a decode step all but the
    activation it was just handed (HOT_OPERANDS); in a prefill every operand. A prefill's activations are
    P rows, megabytes, and each op's are written several ops earlier, past the previous ops' weights: inside
    transformers' prefill of the tiny model (bf16 and fp32, Sapphire Rapids, 2 threads) its projections took
    the time of the evicted calls here, not of the warm ones (bf16 gate projection 1.52 ms per call in the
    model, 1.17-1.21 warm, 1.52-1.56 evicted)."""
    hot = HOT_OPERANDS if phase == "decode" else ()
    return tuple(v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in hot)


def rotating_inputs(inputs: dict, window_bytes: int, max_copies: int = MAX_COPIES) -> list[dict]:
    """Copies of `inputs` whose cold operands (cold_operands, decode) are distinct clones, enough of them to
    span `window_bytes` (at least 2, at most max_copies); the first is `inputs` itself. Called in turns with
    a window of twice the last-level cache, each call finds its weights and KV cache in memory, as in a
    model that streams them once per step, while the code, the TLB's share of the code and the activation
    stay as warm as in a model. Evicting the operands with clflush instead (COLD_METHOD) is slower than
    a model: on the Sapphire Rapids VM the tiny model's bf16 decode GEMMs (batch 8; gate, down, o) took
    0.59 / 0.42 / 0.20 ms evicted, 0.38 / 0.28 / 0.15 rotating through 170 MB or 960 MB of copies alike,
    and 0.44 / 0.34 / 0.22 inside transformers' decode step (module hooks included); fp32 through 340 MB:
    1.02 / 1.02 evicted, 1.04 / 1.00 rotating, 1.03 / 1.10 in transformers."""
    cold = cold_operands(inputs, "decode")
    nbytes = sum(t.untyped_storage().nbytes() for t in cold)
    if not cold or nbytes == 0:
        return [inputs]
    copies = max(2, min(max_copies, -(-window_bytes // nbytes)))
    ids = {id(t) for t in cold}
    return [inputs] + [{k: (v.clone() if id(v) in ids else v) for k, v in inputs.items()} for _ in range(copies - 1)]


def rotation_window_bytes() -> int:
    """What the rotating copies of one problem span: twice the last-level cache, at most MAX_WINDOW_BYTES."""
    return min(2 * timing.cpu_llc_bytes(), MAX_WINDOW_BYTES)


def rotating_calls(family: str, backend, sets: list[dict], call_kwargs: dict):
    """One prepared call per input set (rotating_inputs' copies), called in turn; the prepared call itself
    when there is one set. The first call goes to the first set."""
    fns = [ops.prepare(family, backend=backend, **inp, **call_kwargs) for inp in sets]
    return fns[0] if len(fns) == 1 else Rotation(fns)


class Rotation:
    """A zero-argument callable calling each of `fns` in turn (one per rotating copy)."""

    def __init__(self, fns):
        self.fns, self.i = fns, 0

    def __call__(self):
        f = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return f()


# glibc malloc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_allocator() -> str:
    """Makes glibc malloc keep freed memory for reuse instead of returning it to the OS, as a serving stack's
    allocator does (tcmalloc / jemalloc, which CPU inference guides preload, or a caching allocator), and
    says what it did (recorded with the measurement). With glibc's defaults a block above the dynamic mmap
    threshold (at most 32 MiB) is mapped fresh on every allocation and the trim threshold hands freed heap
    back: every step then pays page faults on its new tensors, differently in a micro-benchmark than in the
    model (a transformers decode step of ref-7b-2k cut to 2 layers, batch 8, fp32: 65,540 page faults, 314
    ms; pinned, none and 265 ms; the torch.cat KV append alone 36 vs 10.8 ms per layer). Process-wide:
    called by the `pykernels tokens --measure` / `--check` commands, never on import."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the platform's default (not glibc: mallopt not found)"
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    if not ok:
        return "glibc defaults (mallopt refused the thresholds)"
    return "glibc malloc, mmap threshold 1 GiB and trim threshold 2 GiB (freed memory kept for reuse)"


def time_cases(fns: list, *, budget_s: float, device: str, cold: bool = False, evict: tuple | None = None,
               min_rounds: int = 3) -> list[dict]:
    """Stats (timing.Stats as dicts) of each zero-argument callable with the harness's timer. On the CPU the
    backends are timed in turns (timing.time_round_robin_cpu: one call of each per round) so that a busy
    spell on a shared machine slows every backend's samples alike and the ratios hold; on a GPU each is
    timed alone with CUDA events, L2 flush and graph batching (timing.time_callable)."""
    # cold: before every call, the `evict` tensors are evicted from the caches (CPU: timing.evict; code, the
    # activations and the rest stay cached, as in a step that streams its weights), or, without `evict` (and
    # on a GPU), the whole cache is flushed with a buffer (timing.time_round_robin_cpu / time_callable)
    opts = timing.TimingOptions(budget_s=budget_s, min_rounds=min_rounds, flush=True if cold else None,
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

    cold (default): on the CPU the kernels of a decode step rotate through copies of their weights and KV
    cache spanning twice the last-level cache (rotating_inputs), as in a model that streams each layer's
    weights and KV cache from memory once per step, with the activation and the code still cached; a
    prefill kernel (and a decode kernel on a GPU) is timed with its operands evicted from every cache level
    before every call (cold_operands, timing.evict; where that is impossible, a buffer of 2x the last-level
    cache is read instead). Each record says which (`cold`, `cold_method`). step_ops: also time the rest of
    a step (tokens/stepops.py) with torch, per dtype. The allocator is pinned first (pin_allocator;
    recorded as `allocator`)."""
    allocator = pin_allocator()
    bes = [registry.get(b) for b in backends]
    meter, meter_reason = energy.meter_for(device)
    benches, skipped = [], []
    t_start = time.perf_counter()
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    fp = _device.fingerprint(device)
    total = len(dtypes) * len(workload.problems())
    decode_problems = {c.problem for c in workload.decode.calls}
    rest = []
    rotate = cold and not device.startswith("cuda")
    window = rotation_window_bytes() if rotate else 0  # the copies span this much
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
            phase = "decode" if prob in decode_problems else "prefill"
            sets = rotating_inputs(inputs, window) if rotate and phase == "decode" else [inputs]
            cases = []  # (backend, callable, extra)
            for be in bes:
                reason = be.supports(prob.family, device.split(":")[0], dtype, **prob.params())
                if reason:
                    skipped.append(
                        {"backend": be.name, "dtype": dt_name, "problem": prob.label(), "reason": reason}
                    )
                    log(f"  skip {be.name:14s} {prob.family:9s} {prob.label()}: {reason}")
                    continue
                fn = rotating_calls(prob.family, be, sets, prob.call_kwargs())
                out_t = fn()  # first call (first set): compilation / autotuning happen here, outside the timing
                for _ in sets[1:]:  # the other copies once each; the rotation is back at the first set
                    fn()
                extra = {"checked": exp is not None}
                if exp is not None:
                    err, ok = exp.check(out_t)
                    extra.update(rel_error=err, tolerance=exp.tolerance, ok=ok)
                cases.append((be, fn, extra))
            if not cases:
                continue
            is_cold, rotated = cold, len(sets) > 1
            rotate_method = ROTATE_METHOD.format(copies=len(sets), mb=sum(
                t.untyped_storage().nbytes() for t in cold_operands(inputs)) * len(sets) / 1e6) if rotated else None
            all_stats = time_cases([c[1] for c in cases], budget_s=budget_s * len(cases), device=device,
                                   cold=is_cold and not rotated, evict=cold_operands(inputs, phase),
                                   min_rounds=max(3, len(sets)))  # rotating: at least once through the copies
            for (be, fn, extra), stats in zip(cases, all_stats):
                extra["cold"] = is_cold
                if rotated:
                    extra["cold_method"] = rotate_method
                elif is_cold:
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
            del inputs, exp, cases, sets
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
            "cold": bool(cold),  # kernels timed with cold caches (decode: weights and KV cache; prefill: all)
            "allocator": allocator,
            "cold_method": (f"{COLD_METHOD}; decode kernels on the CPU: rotating copies of the weights / KV "
                            f"cache, {window / 1e6:.0f} MB (2x the last-level cache)" if rotate
                            else COLD_METHOD if cold else None),
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
    """Times the rest of a step (stepops.step_ops) with torch eager ops, one row each, cold when `cold`:
    what a step reads from memory is evicted before each call, in a decode step a norm's weight, the KV
    cache of an append, the embedding table (the activations, just written by the previous op, and the eager
    stack's code stay cached), in a prefill every operand (see cold_operands)."""
    out = []
    extra, total = stepops.dispatch_ops_per_layer(workload, dtype, device)
    for op in stepops.step_ops(workload):
        fn = stepops.build(op, workload, dtype, device, dispatch_ops=extra)
        fn()
        is_cold = cold
        # what the op reads from memory in a step (stepops.build: decode, its weight or the KV cache; prefill,
        # every operand); () = nothing
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
