"""The issue-21 fixed-cost table: native vs torch at small shapes, and the public API's own cost.

    python tools/overhead.py [--out results/<cpu>/overhead] [--budget 3] [--threads 2]
    python tools/issue6.py --overhead --out results/<cpu>/overhead        (the same, from the issue-6 tool)

Rows: the prepared native call (pk.prepare, what the harness times) against the prepared torch call at the
small shapes of the `small` sweep (GEMM 16^3-128^3, attention B1 H16 S16-128 D64, decode B1 Hq32 Hkv8 D128
contexts 16-128; fp32 and bf16), then `pk.gemm(a, b)` against the prepared native call at 16^3 (the
public API's validation, dispatch and output allocation) beside torch's own `torch.matmul`.

Calls of a few microseconds are timed in batches (k calls per sample, k so that a batch takes ~50 us), and
the callables of a row are timed in turns, one batch of each per round, so that a busy spell on a shared
machine slows all alike; ratios are medians over rounds of the per-round ratio. Outputs are checked
against each other once (the float64 checks of these shapes are in tests/test_overhead.py). No target
here is asserted by a test: timings on a shared machine are not pass/fail material.
Writes OUT.json (every sample) and OUT.md (the table) when --out is given; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import pykernels as pk
from pykernels.harness import device, sweeps

# issue 21: "small shapes (GEMM 16^3 and 64^3, attention S16 D64, decode context 16), prepared calls:
# native >= 1.0x torch"; "public API overhead (pk.gemm minus the prepared call, 16^3) <= 3 us".
TARGET_LABELS = {("gemm", "M16-N16-K16"), ("gemm", "M64-N64-K64")}
API_TARGET_S = 3e-6


def is_target(case) -> bool:
    p = case.problem
    if p.family == "gemm":
        return (p.family, p.label()) in TARGET_LABELS
    if p.family == "attention":
        return p.S == 16 and p.D == 64
    return p.context == 16


def batched_round_robin(fns, budget_s: float, batch_s: float = 50e-6, min_rounds: int = 30):
    """Per-call seconds of each callable: rounds of one batch of each, until the budget is spent."""
    for f in fns:  # warmup, and a per-call estimate for the batch size
        for _ in range(20):
            f()
    ks = []
    for f in fns:
        t0 = time.perf_counter_ns()
        for _ in range(50):
            f()
        per = max((time.perf_counter_ns() - t0) * 1e-9 / 50, 1e-8)
        ks.append(max(1, int(batch_s / per)))
    samples = [[] for _ in fns]
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < t_end:
        for i, (f, k) in enumerate(zip(fns, ks)):
            t0 = time.perf_counter_ns()
            for _ in range(k):
                f()
            samples[i].append((time.perf_counter_ns() - t0) * 1e-9 / k)
        rounds += 1
    return samples, ks


def summary(s: list[float]) -> dict:
    q = statistics.quantiles(s, n=10)
    return {"median_s": statistics.median(s), "p10_s": q[0], "p90_s": q[-1], "min_s": min(s), "rounds": len(s)}


def paired_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den))


def max_rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()


def run(budget: float, families=None) -> dict:
    rows = []
    for case in sweeps.sweep("small"):
        if families and case.family not in families:
            continue
        p = case.problem
        inputs = p.make_inputs(getattr(torch, case.dtype), "cpu", seed=0)
        kw = p.call_kwargs()
        fn_native = pk.prepare(p.family, backend="native", **inputs, **kw)
        fn_torch = pk.prepare(p.family, backend="torch", **inputs, **kw)
        diff = max_rel_diff(fn_native(), fn_torch())
        (s_native, s_torch), _ = batched_round_robin([fn_native, fn_torch], budget)
        rows.append({"kind": "prepared", "family": p.family, "dtype": case.dtype, "shape": p.label(),
                     "target": is_target(case), "native": summary(s_native), "torch": summary(s_torch),
                     "ratio": paired_ratio(s_torch, s_native), "native_vs_torch_rel_diff": diff})
        r = rows[-1]
        print(f"{p.family:9s} {case.dtype:8s} {p.label():36s} native {r['native']['median_s'] * 1e6:8.2f} us  "
              f"torch {r['torch']['median_s'] * 1e6:8.2f} us  native/torch speed {r['ratio']:5.2f}", flush=True)
    api = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = pk.kernels.GemmProblem(16, 16, 16).make_inputs(dtype, "cpu", seed=0).values()
        prepared = pk.prepare("gemm", backend="native", a=a, b=b)
        fns = [lambda a=a, b=b: pk.gemm(a, b), prepared, lambda a=a, b=b: torch.matmul(a, b)]
        (s_api, s_prep, s_mm), _ = batched_round_robin(fns, budget)
        over = statistics.median(x - y for x, y in zip(s_api, s_prep))
        api.append({"kind": "api", "dtype": str(dtype).replace("torch.", ""), "shape": "M16-N16-K16",
                    "pk_gemm": summary(s_api), "prepared": summary(s_prep), "torch_matmul": summary(s_mm),
                    "api_minus_prepared_s": over, "met": over <= API_TARGET_S})
        print(f"pk.gemm {api[-1]['dtype']} 16^3: {s_api and statistics.median(s_api) * 1e6:.2f} us, prepared "
              f"{statistics.median(s_prep) * 1e6:.2f} us, pk.gemm - prepared {over * 1e6:.2f} us, torch.matmul "
              f"{statistics.median(s_mm) * 1e6:.2f} us", flush=True)
    fp = device.fingerprint("cpu")
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "cpu": device.device_label(fp),
            "device": fp, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": rows, "api": api}


def to_markdown(doc: dict) -> str:
    lines = [f"CPU: {doc['cpu']}; torch {doc['torch']}, {doc['threads']} threads, {doc['time_utc']}.", "",
             "| family | dtype | shape | native (prepared) | torch (prepared) | native ÷ torch speed | target |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in doc["rows"]:
        tgt = ("≥ 1.00: " + ("met" if r["ratio"] >= 1.0 else "NOT met")) if r["target"] else "—"
        lines.append(f"| {r['family']} | {r['dtype']} | {r['shape']} | {r['native']['median_s'] * 1e6:.2f} µs | "
                     f"{r['torch']['median_s'] * 1e6:.2f} µs | **{r['ratio']:.2f}** | {tgt} |")
    lines += ["", ("| public API, GEMM 16³ | dtype | pk.gemm | prepared native | pk.gemm − prepared | torch.matmul "
                   "| target ≤ 3 µs |"), "|---|---|---:|---:|---:|---:|---|"]
    for r in doc["api"]:
        lines.append(f"| native | {r['dtype']} | {r['pk_gemm']['median_s'] * 1e6:.2f} µs | "
                     f"{r['prepared']['median_s'] * 1e6:.2f} µs | **{r['api_minus_prepared_s'] * 1e6:.2f} µs** | "
                     f"{r['torch_matmul']['median_s'] * 1e6:.2f} µs | {'met' if r['met'] else 'NOT met'} |")
    lines += ["", ("Medians of per-call times (batches of ~50 µs, the callables of a row in turns); the ratio and the "
                   "difference are medians over rounds of the per-round value. "
                   "Prepared = the callable `pk.prepare` returns (what the harness times)."),
              f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of round-robin timing per row")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--kernel", action="append", default=[], help="only this family (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = run(args.budget, args.kernel)
    md = to_markdown(doc)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
