"""Native CPU ISA tiers against torch, timed in turns in one process (issue 21).

    python tools/isa_tiers.py [--rounds 5] [--only gemm,decode,attention] [--dtype float32] [--out FILE]
    python tools/isa_tiers.py --tiers avx2 --torch-isa avx2 --dtype float32 --out FILE

--torch-isa avx2 caps torch to the same ISA as the tier it is compared with, so that "the AVX2 tier
against torch" on an AVX-512 machine means what it would on an AVX2-only one: it sets, before torch is
imported, ATEN_CPU_CAPABILITY=avx2 (ATen's vectorized kernels: SDPA, reductions), ONEDNN_MAX_CPU_ISA=AVX2
and MKL_ENABLE_INSTRUCTIONS=AVX2 (torch's fp32 GEMM is MKL's: without the last one it stays on AVX-512).
torch's bf16 GEMM has no AVX2 kernel (2048^3 took 56 s on the Sapphire Rapids VM), hence --dtype.

For each case the native backend is timed on every tier this CPU runs (switched with _C.set_cpu_isa
between calls) and torch beside it, round-robin (one call of each per round), so that a busy spell on a
shared machine slows all alike. Reported: medians, ratios native(tier)/torch of the same rounds, and for
the compute-bound rows the fraction of the peak of the matching native probe (docs/probes.md), measured at
the start on every thread: avx2_fp32 for the avx2 tier, avx512_fp32 for fp32 (and for bf16 where the
avx512 tier widens it), avx512_bf16 (vdpbf16ps) or amx_bf16 (tdpbf16ps) for bf16. Memory-bound rows (decode, M = 1 GEMM)
rotate their weights / KV cache through copies spanning 2x the last-level cache (every call streams them
from memory, as a model's step does; native and torch alike) and also get the native STREAM-style read
probe (`_C.ReadPass`, four streams per thread over >= 4x the LLC; docs/probes.md) timed in the same rounds:
% of read bandwidth is the median over rounds of (kernel bytes/s) / (read bytes/s). Outputs are checked
against torch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# The ISA caps torch, MKL and oneDNN read once, when they load: set them before torch is imported.
TORCH_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                          "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
for _i, _a in enumerate(sys.argv[1:], 1):  # "--torch-isa avx2" or "--torch-isa=avx2"; argparse checks it later
    _isa = _a.split("=", 1)[1] if _a.startswith("--torch-isa=") else (
        sys.argv[_i + 1] if _a == "--torch-isa" and _i + 1 < len(sys.argv) else None)
    os.environ.update(TORCH_ISA_ENV.get(_isa, {}))

import torch

from pykernels import _C
from pykernels.kernels import AttentionProblem, DecodeProblem, GemmProblem
from pykernels.tokens import measure


def probe_kind(tier: str, dtype: torch.dtype) -> str:
    """The native probe (docs/probes.md) whose loop is what this tier's kernels run for this dtype."""
    if tier == "avx2":
        return "avx2_fp32"
    if tier == "neon":  # bf16 is widened to fp32 there
        return "neon_fp32"
    if dtype == torch.bfloat16:
        if tier == "amx":
            return "amx_bf16"
        return "avx512_bf16" if _C.cpu_features().get("bf16_dot_used") else "avx512_fp32"
    return "avx512_fp32"


_PEAKS: dict[str, float] = {}


def peak(tier: str, dtype: torch.dtype) -> tuple[str, float]:
    """(probe kind, FLOP/s on every thread: the larger of the wall and thread-CPU-time figures, as device.py)."""
    kind = probe_kind(tier, dtype)
    if kind not in _PEAKS:
        r = _C.probe_compute(kind, None, 0.3)
        _PEAKS[kind] = max(r["flops"], r["flops_cpu_time"])
    return kind, _PEAKS[kind]


def cases(only: set[str], dtypes: list[torch.dtype]):
    return [c for c in all_cases(only) if c[2] in dtypes]


def all_cases(only: set[str]):
    f32, bf16 = torch.float32, torch.bfloat16
    if "gemm" in only:
        for dt in (f32, bf16):
            yield "gemm", GemmProblem(2048, 2048, 2048), dt
        for dt in (f32, bf16):
            yield "gemm", GemmProblem(1, 4096, 4096), dt
    if "attention" in only:
        for dt in (f32, bf16):
            for causal in (False, True):
                yield "attention", AttentionProblem(1, 16, 16, 2048, 128, causal), dt
    if "decode" in only:
        for dt in (f32, bf16):
            for hkv in (8, 32):
                for paged in (False, True):
                    yield "decode", DecodeProblem(8, 32, hkv, 4096, 128, paged=paged, block_size=16), dt


def time_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="gemm,decode,attention")
    ap.add_argument("--tiers", default=",".join(t for t in _C.cpu_isas() if t != "portable"))
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], default=None,
                    help="only this dtype (repeatable; default both)")
    ap.add_argument("--torch-isa", choices=sorted(TORCH_ISA_ENV), default=None,
                    help="cap torch (ATen, oneDNN, MKL) to this ISA: see above")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.torch_isa and torch.backends.cpu.get_cpu_capability().lower() != args.torch_isa:
        ap.error(f"--torch-isa {args.torch_isa}: torch runs {torch.backends.cpu.get_cpu_capability()} "
                 "(the caps are set only when the script is run as a program, before torch is imported)")
    dtypes = [getattr(torch, d) for d in (args.dtype or ["float32", "bfloat16"])]
    tiers = [t for t in args.tiers.split(",") if t]
    only = set(args.only.split(","))
    for t in tiers:  # measured before the cases, on an idle machine
        for dt in dtypes:
            peak(t, dt)
    reader = _C.ReadPass()
    read_bytes = reader.nbytes
    window = measure.rotation_window_bytes()
    caps = ", ".join(f"{k}={v}" for k, v in TORCH_ISA_ENV.get(args.torch_isa, {}).items())
    capped = (f", torch capped to {args.torch_isa} ({caps})" if args.torch_isa
              else f", torch on {torch.backends.cpu.get_cpu_capability()}")
    lines = [f"# native tiers vs torch ({torch.get_num_threads()} threads, torch {torch.__version__}{capped})", "",
             f"command: `python tools/isa_tiers.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "Peaks (native probes, GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in _PEAKS.items()), "",
             "| case | dtype | " + " | ".join(f"{t} ms | {t}/torch | {t} % peak or read-bw" for t in tiers)
             + " | torch ms |", "|" + " --- |" * (3 + 3 * len(tiers))]
    default = _C.cpu_isa()
    for family, prob, dt in cases(only, dtypes):
        x = prob.make_inputs(dt, seed=0)
        mem = family == "decode" or (family == "gemm" and prob.M == 1)
        # memory-bound rows: weights / KV cache streamed from memory on every call, as in a model's step; the
        # copies hold the same values, so every call of a rotation returns the same result
        sets = measure.rotating_inputs(x, window) if mem else [x]
        fns = {"torch": measure.rotating_calls(family, "torch", sets, prob.call_kwargs())}
        native = measure.rotating_calls(family, "native", sets, prob.call_kwargs())
        ref = fns["torch"]().float()
        for t in tiers:
            _C.set_cpu_isa(t)
            err = float((native().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            assert err < (2e-2 if dt == torch.bfloat16 else 1e-3), (t, prob, err)
        _C.set_cpu_isa(default)
        samples = {k: [] for k in [*tiers, "torch", "read"]}
        for _ in range(args.rounds):
            for t in tiers:
                _C.set_cpu_isa(t)
                samples[t].append(time_call(native))
            _C.set_cpu_isa(default)
            samples["torch"].append(time_call(fns["torch"]))
            if mem:
                samples["read"].append(time_call(reader.run))
        med = {k: statistics.median(v) for k, v in samples.items() if v}
        row = f"| {family} {prob.label()} | {str(dt).replace('torch.', '')} |"
        for t in tiers:
            ratio = statistics.median(tt / tn for tn, tt in zip(samples[t], samples["torch"]))
            if mem:
                nbytes = prob.bytes(dt)
                frac = statistics.median((nbytes / tn) / (read_bytes / tr)
                                         for tn, tr in zip(samples[t], samples["read"]))
                extra = f"{100 * frac:.0f}% read"
            else:
                kind, pk_ = peak(t, dt)
                extra = f"{100 * prob.flops() / med[t] / pk_:.0f}% of {kind}"
            row += f" {1e3 * med[t]:.2f} | {ratio:.2f} | {extra} |"
        row += f" {1e3 * med['torch']:.2f} |"
        print(row, flush=True)
        lines.append(row)
    lines += ["", ("Ratios are medians over rounds of time(torch)/time(native) from the same rounds. On a shared "
                   "machine absolute times are not trustworthy; ratios of the same rounds less so.")]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
