"""Smoke test and quick timing of the native CUDA kernels (csrc/cuda) through the public API.

Checks: every family on odd shapes around the block sizes, fp16 and bf16, against the float64
reference with the project's tolerance rule (pykernels.verify); output buffers come from memory that
was filled with NaN just before, so an element the kernel forgets to write fails. Meant to run under
compute-sanitizer too (--small keeps that fast). --perf adds a short timing table against torch's own
(cuBLAS / SDPA / the torch backend) on the shapes of public H100 figures (cuBLAS GEMM 4096^3, FlashAttention-3 paper fig. 5).

    python tools/cuda_smoke.py [--small] [--perf] [--families gemm,attention,decode] [--out FILE.json]

Exit status 1 if any check fails. Environment: PK_CUDA_GEMM=auto|wgmma|mma|scalar forces a GEMM path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import zlib

import torch

import pykernels as pk
from pykernels.harness import verify
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem

DTYPES = [torch.float16, torch.bfloat16]

GEMM = [(1, 1, 1), (1, 4096, 4096), (7, 1000, 513), (16, 2048, 1024), (17, 333, 200), (64, 4096, 4096),
        (65, 127, 1025), (127, 129, 63), (128, 256, 64), (255, 1023, 1001), (1000, 1000, 1000),
        (1024, 1024, 1024), (513, 768, 40), (2048, 2048, 2048), (1, 3, 1000), (1000, 1, 3)]
GEMM_SMALL = [(1, 1, 1), (7, 1000, 513), (17, 333, 200), (65, 127, 1025), (128, 256, 64), (255, 1024, 1000),
              (300, 520, 136)]
# (B, Hq, Hkv, S, D, causal)
ATTN = [(1, 1, 1, 1, 64, True), (3, 8, 1, 2, 128, False), (1, 4, 2, 65, 64, True), (2, 8, 2, 127, 128, False),
        (1, 4, 4, 128, 128, True), (2, 4, 1, 129, 64, False), (1, 2, 2, 1000, 128, True),
        (1, 8, 8, 1025, 64, True), (2, 16, 4, 513, 128, False)]
ATTN_SMALL = [(1, 1, 1, 1, 64, True), (1, 4, 2, 65, 64, True), (2, 4, 1, 129, 128, False), (1, 2, 2, 200, 128, True)]
# (B, Hq, Hkv, context, D, paged, block_size, ragged)
DEC = [(1, 1, 1, 1, 64, False, 16, False), (3, 8, 8, 100, 128, False, 16, True),
       (4, 32, 8, 1000, 128, True, 16, True), (2, 8, 1, 65, 64, True, 7, True), (5, 16, 2, 513, 128, True, 32, True),
       (1, 32, 4, 4096, 128, False, 16, False), (2, 4, 4, 3, 64, True, 1, True), (8, 32, 32, 257, 128, True, 16, False),
       (2, 40, 2, 3000, 128, False, 16, True), (1, 64, 1, 20000, 64, True, 64, False)]
DEC_SMALL = [(1, 1, 1, 1, 64, True, 1, False), (2, 8, 1, 65, 64, True, 7, True), (3, 8, 2, 300, 128, False, 16, True),
             (1, 16, 16, 1000, 128, True, 16, False)]


def _poison_cache(nbytes: int) -> None:
    """Fill a block of at least nbytes with NaN and free it: torch's caching allocator hands the same
    memory to the next allocation of that size, so an output element the kernel never writes stays NaN."""
    n = max(1, nbytes // 2)
    t = torch.full((n,), float("nan"), dtype=torch.float16, device="cuda")
    del t


def _problems(small: bool, families: list[str]):
    if "gemm" in families:
        for s in (GEMM_SMALL if small else GEMM):
            yield GemmProblem(*s)
    if "attention" in families:
        for s in (ATTN_SMALL if small else ATTN):
            yield AttentionProblem(*s)
    if "decode" in families:
        for s in (DEC_SMALL if small else DEC):
            yield DecodeProblem(*s)


def _out_bytes(problem, inputs) -> int:
    if problem.family == "gemm":
        return problem.M * problem.N * 2
    return inputs["q"].numel() * 2


def check(small: bool, families: list[str]) -> list[dict]:
    rows = []
    for problem in _problems(small, families):
        for dtype in DTYPES:
            row = {"family": problem.family, "label": problem.label(), "dtype": str(dtype).replace("torch.", "")}
            try:
                inputs = problem.make_inputs(dtype, device="cuda", seed=zlib.crc32(problem.label().encode()) % 1000)
                exp = verify.expected(problem, inputs)
                _poison_cache(_out_bytes(problem, inputs))
                out = getattr(pk, problem.family)(**inputs, **problem.call_kwargs(), backend="native")
                torch.cuda.synchronize()
                err, ok = exp.check(out)
                row.update(error=err, tolerance=exp.tolerance, ok=bool(ok))
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                row.update(ok=False, error=float("nan"), exception=f"{type(e).__name__}: {e}")
                traceback.print_exc()
                if "illegal" in str(e).lower() or "sticky" in str(e).lower():
                    rows.append(row)
                    return rows  # the context is dead after a fault
            rows.append(row)
            mark = "ok  " if row["ok"] else "FAIL"
            print(f"{mark} {row['family']:9s} {row['dtype']:8s} {row['label']:40s} err {row.get('error', 0):.3g} "
                  f"tol {row.get('tolerance', 0):.3g} {row.get('exception', '')}", flush=True)
    return rows


def _time_ms(fn, reps: int = 30) -> float:
    """Median of CUDA-event times, L2 flushed (write of 2x the L2 size) before each call."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


PERF = [
    GemmProblem(4096, 4096, 4096), GemmProblem(8192, 8192, 8192), GemmProblem(1, 4096, 4096),
    GemmProblem(16, 4096, 11008), GemmProblem(64, 4096, 4096), GemmProblem(2048, 4096, 4096),
    AttentionProblem(1, 32, 32, 4096, 128, False), AttentionProblem(1, 32, 32, 4096, 128, True),
    AttentionProblem(4, 32, 8, 2048, 128, True), AttentionProblem(1, 32, 32, 4096, 64, False),
    DecodeProblem(8, 32, 8, 4096, 128), DecodeProblem(32, 32, 32, 2048, 128),
    DecodeProblem(32, 32, 8, 4096, 128, paged=True, block_size=16), DecodeProblem(1, 32, 8, 32768, 128),
]


def perf() -> list[dict]:
    rows = []
    for problem in PERF:
        dtype = torch.bfloat16
        inputs = problem.make_inputs(dtype, device="cuda")
        kw = problem.call_kwargs()
        fn = getattr(pk, problem.family)
        row = {"family": problem.family, "label": problem.label(), "dtype": "bfloat16"}
        for backend in ("native", "torch"):
            try:
                ms = _time_ms(lambda b=backend, f=fn, i=inputs, k=kw: f(**i, **k, backend=b))
            except Exception as e:  # noqa: BLE001
                row[backend] = f"{type(e).__name__}: {e}"
                continue
            row[f"{backend}_ms"] = ms
            row[f"{backend}_tflops"] = problem.flops() / ms / 1e9
            row[f"{backend}_gbs"] = problem.bytes(dtype) / ms / 1e6
        if "native_ms" in row and "torch_ms" in row:
            row["native_vs_torch"] = row["torch_ms"] / row["native_ms"]
        rows.append(row)
        print(f"perf {row['family']:9s} {row['label']:40s} native {row.get('native_ms', float('nan')):8.3f} ms "
              f"{row.get('native_tflops', 0):7.1f} TFLOP/s {row.get('native_gbs', 0):7.0f} GB/s | torch "
              f"{row.get('torch_ms', float('nan')):8.3f} ms {row.get('torch_tflops', 0):7.1f} TFLOP/s "
              f"{row.get('torch_gbs', 0):7.0f} GB/s | x{row.get('native_vs_torch', float('nan')):.2f}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="few small shapes (for compute-sanitizer)")
    ap.add_argument("--perf", action="store_true", help="time the anchor shapes against torch")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--families", default="gemm,attention,decode")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(0), "gemm_path": os.environ.get("PK_CUDA_GEMM", "auto"),
              "torch": torch.__version__, "checks": [], "perf": []}
    if not args.no_check:
        result["checks"] = check(args.small, fams)
    if args.perf:
        result["perf"] = perf()
    result["seconds"] = time.time() - t0
    bad = [r for r in result["checks"] if not r["ok"]]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(f"checks: {len(result['checks']) - len(bad)} ok, {len(bad)} failed "
          f"(gemm path {result['gemm_path']}, {result['seconds']:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
