"""The issue-6 table: native vs torch on this CPU, as ratios timed in turns in one process.

    python tools/issue6.py --out results/cpu-zen4-2c/issue6 [--budget 4] [--threads 2]
    python tools/issue6.py --from-json results/cpu-zen4-2c/issue6.json --out results/cpu-zen4-2c/issue6 \
        --readme README.md          # no measuring: the Markdown again from the JSON, pasted into the README
    python tools/issue6.py --overhead --out results/cpu-zen4-2c/overhead     (small shapes: tools/overhead.py)

For every case of the `quick` sweep (pykernels/harness/sweeps.py) the native and the torch callables (from
pk.prepare: validation and the first call happen before timing) are timed round-robin, one call of each
per round, so that a busy spell on a shared machine slows both alike. speedup of native over torch =
throughput(native) / throughput(torch) = median time(torch) / median time(native) (the report convention,
docs/harness.md); torch's penalty against native ("tax") = 1 − throughput(torch) / throughput(native) =
1 − 1/speedup; per family the geometric mean of the speedups over the shapes. A copy bandwidth (dst.copy_(src) of 256 MiB,
read + write bytes) and a read bandwidth (src.sum()) are measured at the start and at the end of the same
run, and for each memory-bound case (decode-sized GEMMs, decode) the copy and the native STREAM-style read
probe (`_C.ReadPass`: four streams per thread over >= 4x the last-level cache; torch's `src.sum()` is one
stream and reads ~25% slower on the Sapphire Rapids VM) are also timed in the same rounds as native and
torch, whose weights / KV cache rotate through copies spanning 2x the last-level cache (each call streams
them from memory, as a model's step does): that case's bytes/s are reported as % of the copy and read of its
own rounds (median over rounds of the per-round ratio): the bandwidth of this shared VM moves by 2x
within minutes, so a copy timed minutes apart would not be the same machine.
The rows with an issue-21 peak target (GEMM 2048^3, attention S2048) also time the dtype's peak probe loop
(`_C.ComputePass`, ~10 ms of fixed work) in their rounds: beside the share of the cached peak (the probe's
best trial, by CPU time) the table gives the median over rounds of the kernel's share of that round's probe.
The native output is checked against torch's (the float64 checks live in the tests and the sweeps).
Writes OUT.json (every sample statistic) and OUT.md (the table); --readme FILE replaces the block between
`<!-- issue6-table ... -->` and `<!-- /issue6-table -->` in FILE with OUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from pykernels import _C
from pykernels.harness import device, sweeps, timing
from pykernels.kernels import dtype_of
from pykernels.tables import fmt_speedup, natural_key
from pykernels.tokens import measure

TARGET = {"gemm": 1.0, "attention": 1.0, "decode": 1.2}


def target(case) -> float:
    p = case.problem
    if p.family == "gemm" and p.M >= 1024:
        return 0.60 if case.dtype == "bfloat16" else 0.90
    return TARGET[p.family]


def target21(family: str, dtype: str, params: dict) -> tuple[str, float] | None:
    """Issue 21's targets for the row: ('peak', fraction of the dtype's compute peak probe) or ('read', fraction
    of the read bandwidth of the same rounds); None where the issue sets none."""
    if family == "gemm" and params.get("M") == 2048:
        return ("peak", 0.90 if dtype == "bfloat16" else 0.85)
    if family == "gemm" and params.get("M") == 1 and params.get("K") == 4096:
        return ("read", 0.85)
    if family == "attention" and params.get("S") == 2048:
        return ("peak", 0.75 if dtype == "bfloat16" else 0.80)
    if family == "decode" and params.get("B") == 8:
        return ("read", 0.85)
    return None


# Bandwidth-bound rows are compared with the copy / read probes timed in the same rounds. Below this many
# bytes a decode or a skinny GEMM lives in the caches and costs mostly its fixed overhead (decode B1 L16-L128,
# GEMM 16^3: tools/overhead.py times those in batches); interleaving them with 256 MiB probes made their
# calls cold and their rows meaningless (a 0.3 us GEMM 16^3 read as 10 us, "1% of copy").
MEMORY_BOUND_MIN_BYTES = 16 << 20


def memory_bound(case) -> bool:
    p = case.problem
    return ((case.family == "decode" or (case.family == "gemm" and p.M <= 16))
            and p.bytes(dtype_of(case.dtype)) >= MEMORY_BOUND_MIN_BYTES)


def paired(nbytes: float, t_kernel: list[float], ref_bytes: float, t_ref: list[float]) -> float:
    """Median over rounds of (kernel bytes/s) / (reference bytes/s), both from the same round: the
    bandwidth of this shared VM moves within seconds, and a ratio of two medians can pair a kernel call
    from a fast spell with a copy from a slow one."""
    return statistics.median((nbytes / tk) / (ref_bytes / tr) for tk, tr in zip(t_kernel, t_ref))


def bandwidth() -> dict:
    return device.bandwidth_probe("cpu", budget_s=2.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of round-robin timing per case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--kernel", action="append", default=[], help="only this family (repeatable)")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="measure nothing: write OUT.md from this earlier OUT.json (the current convention)")
    ap.add_argument("--readme", default=None, metavar="FILE",
                    help="paste OUT.md between the BLOCK markers of FILE (the README)")
    ap.add_argument("--block", default="issue6-table",
                    help="the README block: <!-- BLOCK ... --> ... <!-- /BLOCK --> (one per CPU; default %(default)s)")
    ap.add_argument("--overhead", action="store_true",
                    help="instead: the issue-21 fixed-cost table (small shapes, pk.gemm - prepared), tools/overhead.py")
    args = ap.parse_args(argv)
    if args.overhead:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import overhead

        return overhead.main(["--out", args.out, "--budget", str(min(args.budget, 2.0))]
                             + (["--threads", str(args.threads)] if args.threads else [])
                             + [x for k in args.kernel for x in ("--kernel", k)])
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        out = Path(args.out)
        out.with_suffix(".md").write_text(to_markdown(doc))
        if args.readme:
            paste(Path(args.readme), out.with_suffix(".md"), args.block)
        print(to_markdown(doc))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in sweeps.sweep("quick") if not args.kernel or c.family in args.kernel]
    load0 = os.getloadavg()[0]
    bw0 = bandwidth()
    nbytes_bw = 256 << 20
    src = torch.ones(nbytes_bw // 4)
    dst = torch.empty_like(src)
    reader = _C.ReadPass()  # the native STREAM-style read (docs/probes.md) over >= 4x the LLC, allocated once
    window = measure.rotation_window_bytes()
    # Compute peaks: the native probes (cached per machine; pykernels info --peaks --refresh-peaks re-measures).
    peaks = device.peaks("cpu", sorted({c.dtype for c in cases}))
    # The rows with an issue-21 peak target also time the dtype's peak probe loop in their rounds (about 10 ms
    # of fixed work per call): the kernel's share of the probe of the same rounds, as for the read bandwidth.
    passes = {}
    peak_rows = [c for c in cases if (target21(c.family, c.dtype, c.problem.__dict__) or ("",))[0] == "peak"]
    for dt in sorted({c.dtype for c in peak_rows}):
        kind = (peaks.get("flops", {}).get(dt) or {}).get("kind")
        if kind in set(_C.probe_kinds().get("compute", ())):
            passes[dt] = _C.ComputePass(kind, None, 0.01)
    rows = []
    for case in cases:
        p, dt = case.problem, dtype_of(case.dtype)
        inputs = p.make_inputs(dt, "cpu", seed=0)
        kw = p.call_kwargs()
        # memory-bound rows: weights / KV cache streamed from memory on every call, as in a model's step
        sets = measure.rotating_inputs(inputs, window) if memory_bound(case) else [inputs]
        fns = [measure.rotating_calls(p.family, b, sets, kw) for b in ("native", "torch")]
        out_native, out_torch = fns[0](), fns[1]()
        err = ((out_native.double() - out_torch.double()).abs().max() /
               out_torch.double().abs().max().clamp_min(1e-30)).item()
        opts = timing.TimingOptions(budget_s=args.budget, rse_target=0.01, min_rounds=5, warmup_s=0.2)
        t0 = time.perf_counter()
        bw_fns = [lambda: dst.copy_(src), reader.run] if memory_bound(case) else []
        t21 = target21(p.family, case.dtype, p.__dict__)
        cpass = passes.get(case.dtype) if t21 and t21[0] == "peak" else None
        st_native, st_torch, *st_bw = timing.time_round_robin_cpu(fns + bw_fns + ([cpass.run] if cpass else []), opts)
        st_cp = st_bw.pop() if cpass else None
        nbytes, flops = p.bytes(dt), p.flops()
        row = {"family": p.family, "dtype": case.dtype, "shape": p.label(), "params": p.__dict__ | {},
               "flops": flops, "bytes": nbytes, "target": target(case), "memory_bound": memory_bound(case),
               "native": st_native.as_dict(), "torch": st_torch.as_dict(),
               "ratio": st_torch.median_s / st_native.median_s,
               "ratio_p20_p80": [st_torch.p20_s / st_native.p80_s, st_torch.p80_s / st_native.p20_s],
               "native_vs_torch_rel_error": err, "input_copies": len(sets), "seconds": time.perf_counter() - t0}
        if st_bw:
            row["copy"], row["read"] = st_bw[0].as_dict(), st_bw[1].as_dict()
            row["native_samples"], row["copy_samples"], row["read_samples"] = (
                st_native.samples, st_bw[0].samples, st_bw[1].samples)
            row["copy_bytes_per_s"] = 2 * nbytes_bw / st_bw[0].median_s
            row["read_bytes_per_s"] = reader.nbytes / st_bw[1].median_s
        if st_cp:
            row["probe_rounds"] = {"kind": cpass.kind, "flop": cpass.flop, "threads": cpass.threads, **st_cp.as_dict()}
            row["pct_peak_rounds"] = 100.0 * paired(flops, st_native.samples, cpass.flop, st_cp.samples)
        rows.append(row)
        print(f"{p.family:9s} {case.dtype:8s} {p.label():40s} native {st_native.median_s * 1e3:9.3f} ms  "
              f"torch {st_torch.median_s * 1e3:9.3f} ms  ratio {row['ratio']:5.2f}", flush=True)
    bw1 = bandwidth()
    copy_bw = max(bw0["copy_bytes_per_s"], bw1["copy_bytes_per_s"])
    for r in rows:
        r["native_bytes_per_s"] = r["bytes"] / r["native"]["median_s"]
        if r["memory_bound"]:
            r["pct_copy_bw"] = 100.0 * paired(r["bytes"], r["native_samples"], 2 * nbytes_bw, r["copy_samples"])
            r["pct_read_bw"] = 100.0 * paired(r["bytes"], r["native_samples"], reader.nbytes, r["read_samples"])
        else:
            r["pct_copy_bw"] = r["pct_read_bw"] = None
        r["met"] = r["ratio"] >= r["target"] and not (r["family"] == "decode" and r["memory_bound"]
                                                      and r["pct_copy_bw"] < 80.0)
    for r in rows:
        pk_fl = (peaks.get("flops", {}).get(r["dtype"]) or {}).get("flops_per_s")
        r["peak_flops_per_s"] = pk_fl
        r["pct_peak"] = 100.0 * r["flops"] / r["native"]["median_s"] / pk_fl if pk_fl else None
        t21 = target21(r["family"], r["dtype"], r["params"])
        r["target21"] = t21
        if t21:
            got = r["pct_peak"] if t21[0] == "peak" else r.get("pct_read_bw")
            r["met21"] = got is not None and got >= 100 * t21[1] and r["ratio"] >= 1.0
    fp = device.fingerprint("cpu")
    doc = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": fp,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bandwidth_start": bw0,
           "bandwidth_end": bw1, "copy_bytes_per_s": copy_bw, "peaks_flops": peaks.get("flops"),
           "load_avg_1min": [load0, os.getloadavg()[0]],
           "read_probe": {"kind": "native read (_C.ReadPass: 4 streams per thread)", "nbytes": reader.nbytes},
           "rotation_window_bytes": window, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(doc))
    if args.readme:
        paste(Path(args.readme), out.with_suffix(".md"), args.block)
    print(to_markdown(doc))
    return 0


def paste(readme: Path, md: Path, block: str = "issue6-table") -> None:
    """Replace the README's block (markers kept) with the Markdown file: tools/readme_results.py's paste."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import readme_results

    readme_results.paste(str(readme), block, md.read_text())


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _pct(x) -> str:
    return "" if x is None else f"{x:.0f}%"


def _t21(t) -> str:
    if not t:
        return ""
    return f"≥ {100 * t[1]:.0f}% of {'peak' if t[0] == 'peak' else 'read'}, ≥ 1.00×"


def to_markdown(doc: dict) -> str:
    lines = [("| family | dtype | shape | native | torch | speedup native over torch (×, p20–p80 range) | "
              "torch's penalty vs native | target | native GB/s: % of copy, of read (same rounds) | met | "
              "native: % of compute peak (probe) | % of the peak probe of the same rounds | issue-21 target | met 21 |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    order = {"gemm": 0, "attention": 1, "decode": 2}
    for r in sorted(doc["rows"], key=lambda r: (order.get(r["family"], 9), r["dtype"], natural_key(r["shape"]))):
        tn, tt = r["native"]["median_s"], r["torch"]["median_s"]
        if r["memory_bound"]:
            thr = (f"{r['native_bytes_per_s'] / 1e9:.1f} GB/s: {r['pct_copy_bw']:.0f}% of "
                   f"{r['copy_bytes_per_s'] / 1e9:.1f}, {r['pct_read_bw']:.0f}% of {r['read_bytes_per_s'] / 1e9:.1f}")
        else:
            thr = "—"
        lo, hi = r["ratio_p20_p80"]
        tgt = f"≥ {r['target']:.2f}×" + (", ≥ 80% copy" if r["family"] == "decode" and r["memory_bound"] else "")
        lines.append(f"| {r['family']} | {r['dtype']} | {r['shape']} | {tn * 1e3:.3f} ms | {tt * 1e3:.3f} ms | "
                     f"**{r['ratio']:.2f}×** ({lo:.2f}–{hi:.2f}) | {100 * (1 - 1 / r['ratio']):.0f}% | {tgt} | {thr} | "
                     f"{'yes' if r['met'] else 'NO'} | {_pct(r.get('pct_peak'))} | {_pct(r.get('pct_peak_rounds'))} | "
                     f"{_t21(r.get('target21'))} | "
                     f"{'' if not r.get('target21') else 'yes' if r.get('met21') else 'NO'} |")
    fams = list(dict.fromkeys(r["family"] for r in doc["rows"]))
    lines += ["", "| family | shapes | geometric mean of the speedup native over torch | torch's penalty vs native | met |",
              "|---|---:|---:|---:|---:|"]
    for fam in fams:
        rs = [r for r in doc["rows"] if r["family"] == fam]
        g = _geomean([r["ratio"] for r in rs])
        lines.append(f"| {fam} | {len(rs)} | **{fmt_speedup(g)}** | {100 * (1 - 1 / g):.0f}% | "
                     f"{sum(bool(r['met']) for r in rs)} of {len(rs)} |")
    bw = doc["copy_bytes_per_s"]
    lines += ["", ("Speedup = throughput(native) / throughput(torch) = median time(torch) / median time(native), "
                   "the range from the p20 and p80 times; torch's penalty (the abstraction \"tax\") = "
                   "1 − throughput(torch) / throughput(native) = 1 − 1/speedup; rows within a family are summarised by "
                   "the geometric mean over its shapes."),("Copy: `dst.copy_(src)` of 256 MiB fp32, bytes read + written; read: "
              + (f"the native STREAM-style read probe (`_C.ReadPass`, four streams per thread) over "
                 f"{doc['read_probe']['nbytes'] >> 20} MiB, bytes read" if doc.get("read_probe") else "`src.sum()` of 256 MiB, bytes read")
              + "; both timed in the same rounds as native and torch for that row, for rows of at least "
              f"{MEMORY_BOUND_MIN_BYTES >> 20} MiB (smaller ones live in the caches and show —)"
              + (f", whose weights / KV cache rotate through copies spanning {doc['rotation_window_bytes'] >> 20} MiB "
                 "(2× the last-level cache) for native and torch alike, so every call streams them from memory"
                 if doc.get("rotation_window_bytes") else "") + "; the % is the median "
              "over rounds of the per-round ratio, the GB/s beside it are medians (a kernel that only reads can pass 100% of "
              "the copy, which writes as much as it reads). The best copy bandwidth of the "
              f"probes at the start and the end of the run: {bw / 1e9:.1f} GB/s. "
              f"torch {doc['torch']}, {doc['threads']} threads, {doc['time_utc']}"
              + (", load average (1 min) at the start and the end: {:.1f}, {:.1f}.".format(*doc["load_avg_1min"])
                 if doc.get("load_avg_1min") else ".")),
              *([("% of compute peak: native FLOP/s over the dtype's peak from the native probes of this machine "
                  "(docs/probes.md: register-resident FMA / vdpbf16ps / AMX tdpbf16ps loops on every thread): "
                  + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.0f} GFLOP/s ({v.get('instruction', '').split()[0]})"
                              for k, v in doc["peaks_flops"].items() if v and v.get("flops_per_s"))
                  + ". Issue-21 targets: % of that peak or of the read bandwidth of the same rounds, and ≥ 1.00× "
                  "torch. That peak is the probe's best ~10 ms trial by each thread's own CPU time (the cores' rate "
                  "while they run), the kernel's figure a median of wall times; the column beside it pairs each "
                  "round's kernel call with a call of the same probe loop (`_C.ComputePass`, ~10 ms of fixed work, "
                  "wall time) timed in that round, median over rounds of the per-round ratio: what the kernel "
                  "gets of what the probe got in the same minutes. The targets are judged against the cached "
                  "peak.")] if doc.get("peaks_flops") else []),
              f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
