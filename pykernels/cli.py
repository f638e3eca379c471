"""The `pykernels` command.

    pykernels bench [--sweep quick|full|small|smoke | --shape K=V,... | --model NAME] [--backend NAME]...
                    [--kernel FAMILY]... [--dtype DT]... [--json out.json] [--resume] [-- PYTEST ARGS]
    pykernels info [--device cpu|cuda] [--peaks] [--json] [--support]
    pykernels report RESULTS... [--format terminal|md|csv] [--md [FILE]] [--csv FILE]
    pykernels compare A B [C...] [--label NAME]... [--format terminal|md|csv] [--all] [--fail-on-slower PCT]
    pykernels plot RESULTS... [--out DIR]
    pykernels tune [--threads N] [--budget S] [--show] [--clear] [--dry-run] [--out FILE]
    pykernels fleet [--address ADDR] [bench's sweep options] [--out DIR] [--resume]   (Ray: pykernels/fleet)

Subcommands are registered in SUBCOMMANDS: a name and either a function here or "module:attr" of an
`add_parser(subparsers)` that sets `func(args) -> int` (validate and tokens live in their own modules).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------
# bench: the benchmark sweeps, through pytest with the package's own configuration

# bench option -> (pytest option, takes a value, repeatable)
_BENCH_OPTS = {
    "sweep": ("--pk-sweep", True, False), "shape": ("--pk-shape", True, True), "model": ("--pk-model", True, False),
    "model_prompt": ("--pk-model-prompt", True, False), "model_context": ("--pk-model-context", True, False),
    "model_batch": ("--pk-model-batch", True, False), "backend": ("--pk-backend", True, True),
    "kernel": ("--pk-kernel", True, True), "dtype": ("--pk-dtype", True, True), "device": ("--pk-device", True, False),
    "resume": ("--pk-resume", False, False), "journal": ("--pk-journal", True, False),
    "time_budget": ("--pk-time-budget", True, False), "cold_cache": ("--pk-cold-cache", False, False),
    "refresh_peaks": ("--pk-refresh-peaks", False, False), "json": ("--benchmark-json", True, False),
    "threads": ("--pk-threads", True, False),
    "case_timeout": ("--pk-case-timeout", True, False), "retry_crashed": ("--pk-retry-crashed", False, False),
}


def _add_bench(sub):
    p = sub.add_parser(
        "bench", help="run the benchmark sweeps (timed; results as pytest-benchmark JSON)",
        description="Time every backend on every case of a sweep, check each output against the float64 "
                    "reference, print the speedup tables and write pytest-benchmark JSON. Runs pytest on the "
                    "sweeps shipped in the package, with the package's own pytest configuration (works in any "
                    "directory). Arguments after -- go to pytest unchanged.",
        epilog="Exit status: 0 all measured and correct; 1 a case failed or nothing was measured; 2 usage error.")
    p.add_argument("--sweep", choices=("smoke", "small", "quick", "full"), default=None,
                   help="shape sweep (default quick): smoke (tiny), small (fixed costs: GEMM 16^3-128^3, ...), "
                        "quick (< 5 min on 2 cores), full (+ ref-7b-2k)")
    p.add_argument("--shape", action="append", default=[], metavar="K=V,...",
                   help="instead of --sweep, this shape (repeatable): 'M=4096,N=4096,K=4096' (gemm; ',layout=nt': pk.linear), "
                        "'B=1,Hq=32,Hkv=8,S=2048,D=128,causal=1' (attention), "
                        "'B=8,Hq=32,Hkv=8,L=4096,D=128,paged=1,block_size=16' (decode)")
    p.add_argument("--model", default=None, metavar="NAME|FILE",
                   help="instead of --sweep, the kernel shapes of a model (ref-7b-2k, ref-8b-gqa, tiny, or a JSON file)")
    p.add_argument("--model-prompt", type=int, default=None, metavar="P", help="with --model: prompt tokens")
    p.add_argument("--model-context", type=int, default=None, metavar="L", help="with --model: decode context")
    p.add_argument("--model-batch", type=int, default=None, metavar="B", help="with --model: decode batch")
    p.add_argument("--backend", action="append", default=[], metavar="NAME", help="only this backend (repeatable)")
    p.add_argument("--kernel", action="append", default=[], choices=("gemm", "attention", "decode"),
                   help="only this family (repeatable)")
    p.add_argument("--dtype", action="append", default=[], metavar="DTYPE", help="only this dtype (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results (pytest-benchmark JSON)")
    p.add_argument("--resume", action="store_true", help="replay the cases already in the journal")
    p.add_argument("--journal", default=None, metavar="FILE", help="journal file (default: per machine and sweep)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="seconds of timing per case")
    p.add_argument("--cold-cache", action="store_true", help="flush the caches between timed calls")
    p.add_argument("--refresh-peaks", action="store_true", help="measure the device's peaks again")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="run on N threads (torch, BLAS/OpenMP pools, native kernels); recorded with the CPU affinity")
    p.add_argument("--case-timeout", type=float, default=None, metavar="S",
                   help="seconds before a case counts as hung and fails (default 900; 0: no limit)")
    p.add_argument("--retry-crashed", action="store_true",
                   help="with --resume: run again the cases recorded as crashed or hung")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: more pytest arguments")
    p.set_defaults(func=cmd_bench)


def bench_argv(args) -> list[str]:
    """The pytest command line of `pykernels bench`: the package's bench directory as rootdir and test path,
    its bench.ini as configuration, every option in --opt=value form (no value is taken for a path)."""
    from . import bench

    here = Path(bench.__file__).resolve().parent
    argv = ["-c", str(here / "bench.ini"), "--rootdir", str(here), "--import-mode=importlib", "--pk-bench"]
    for key, (opt, has_value, repeat) in _BENCH_OPTS.items():
        val = getattr(args, key, None)
        if val is None or val is False or val == []:
            continue
        if not has_value:
            argv.append(opt)
        else:
            for v in (val if repeat else [val]):
                argv.append(f"{opt}={os.path.abspath(v) if key in ('json', 'journal') else v}")
    extra = list(args.pytest_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return argv + extra + [str(here)]


def cmd_bench(args) -> int:
    import pytest

    if args.model is None and any(v is not None for v in (args.model_prompt, args.model_context, args.model_batch)):
        raise CliError("--model-prompt/--model-context/--model-batch need --model")
    rc = int(pytest.main(bench_argv(args)))
    return 2 if rc == int(pytest.ExitCode.USAGE_ERROR) else rc


# ---------------------------------------------------------------------------------------------------
# info


def _add_info(sub):
    p = sub.add_parser("info", help="the device fingerprint, measured peaks and every backend's availability",
                       description="Print the device fingerprint, the measured peaks (cached per machine) and every "
                                   "backend with whether it is available here and, if not, why.")
    p.add_argument("--device", default=None, help="device to describe (default: cuda when available, else cpu)")
    p.add_argument("--peaks", action="store_true",
                   help="measure the peaks now if the cache lacks them (a few seconds per dtype)")
    p.add_argument("--refresh-peaks", action="store_true", help="measure the peaks again, ignoring the cache")
    p.add_argument("--dtype", action="append", default=[], help="dtypes for the compute probe (default float32, bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="pin torch, the BLAS/OpenMP pools and the native kernels to N threads before measuring")
    p.add_argument("--support", action="store_true",
                   help="print only the backend x family x dtype x device support table, with the reason for each "
                        "gap (every device type unless --device; with --json, as JSON)")
    p.add_argument("--md", action="store_true", help="with --support: Markdown instead of the terminal table")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    import torch

    from . import report
    from .backends import registry
    from .harness import device
    from .kernels import dtype_name, dtype_of

    if args.support:
        return _info_support(args)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    why = device.device_problem(dev)
    if why:
        raise CliError(f"--device: {why}")
    try:
        dtypes = [dtype_name(dtype_of(d)) for d in args.dtype] or ["float32", "bfloat16"]
    except ValueError as e:
        raise CliError(f"--dtype: {e}") from None
    from .harness import threads

    try:
        thr = threads.pin_threads(args.threads) if args.threads is not None else threads.state()
    except ValueError as e:
        raise CliError(f"--threads: {e}") from None
    fp = device.fingerprint(dev)
    measure = args.peaks or args.refresh_peaks
    pk = device.peaks(dev, dtypes, refresh=args.refresh_peaks, measure=measure, fp=fp)
    backs = [registry.info(b) for b in registry.all_backends().values()]
    if args.json:
        print(json.dumps({"device": fp, "peaks": pk, "threads": thr, "backends": [b.__dict__ for b in backs]},
                         indent=1, default=str))
        return 0
    print(device.device_label(fp))
    for k in ("vendor", "family_model", "stepping", "microarch", "cores", "threads", "mhz", "caches", "isa", "capability",
              "sm_count", "l2_bytes", "memory_bytes", "driver", "clocks_mhz", "cuda_runtime", "host", "os"):
        if fp.get(k) not in (None, [], ""):
            print(f"  {k:14s} {' '.join(fp[k]) if isinstance(fp[k], list) else fp[k]}")
    print(f"  {'versions':14s} " + ", ".join(f"{k} {v}" for k, v in fp["versions"].items() if v))
    print(f"  {'build':14s} " + ", ".join(f"{k}={v}" for k, v in fp.get("build", {}).items()))
    print(f"  {'run threads':14s} torch {thr.get('torch')}, native {thr.get('native')}, affinity {thr.get('affinity')}"
          + (f" (pinned: --threads {thr['requested']})" if thr.get("requested") else ""))
    f = fp.get("cpu_features") or {}
    if fp.get("type") == "cpu" and "stream_prefetch" in f:  # what `pykernels tune` sets, and where it came from
        print(f"  {'native tuning':14s} decode prefetch {f['stream_prefetch']}, near "
              f"{'on' if f['stream_prefetch_near'] else 'off'}, {f['stream_prefetch_distance'] // 1024} KB; paged step "
              f"{f['paged_step']} tokens; GEMV rows per step {f['gemv_streams']}  [{f['stream_prefetch_source']}]")
    print("hardware peaks (measured on this machine by the probes; the % of peak of every result):")
    bwd = pk.get("bandwidth") or {}
    bw = device.peak_bandwidth(pk)
    if bw:
        runs = ", ".join(f"{k} {report.fmt_rate(v, 'B/s')}" for k, v in (bwd.get("runs_bytes_per_s") or {}).items())
        print(f"  bandwidth       {report.fmt_rate(bw, 'B/s')}  [{bwd.get('probe')}{': ' + runs if runs else ''}]")
    else:
        print("  bandwidth       not measured (run with --peaks)")
    spec = pk.get("spec") or {}
    for dt in dtypes:
        f = (pk.get("flops") or {}).get(dt) or {}
        if not f:
            print(f"  {dt:15s} not measured")
            continue
        extra = ""
        if f.get("flop_per_cycle_per_core"):
            extra = f", {f['flop_per_cycle_per_core']:.1f} FLOP/cycle/core at {f['ghz']:.2f} GHz (clock probe)"
        sf = (spec.get("flops") or {}).get(dt)
        if sf:
            extra += f"; {100 * f['flops_per_s'] / sf:.0f}% of the spec figure {report.fmt_rate(sf, 'FLOP/s')}"
        print(f"  {dt:15s} {report.fmt_rate(f['flops_per_s'], 'FLOP/s')}  [{f.get('probe')}{extra}]")
    for dt in dtypes:
        v = (pk.get("vendor_ceiling") or {}).get(dt) or {}
        if v:
            print(f"  vendor ceiling  {dt} {report.fmt_rate(v['flops_per_s'], 'FLOP/s')}  [torch.matmul n={v.get('n')}]")
    if spec:
        figs = ", ".join(f"{dt} {report.fmt_rate(v, 'FLOP/s')}" for dt, v in (spec.get("flops") or {}).items())
        if spec.get("bandwidth"):
            figs += f", memory {report.fmt_rate(spec['bandwidth'], 'B/s')}"
        print(f"  spec            {figs}  [{spec.get('source')}]")
    print(f"  cache           {pk.get('cache')}")
    print("backends:")
    for b in backs:
        state = "available" if b.available else f"unavailable: {b.reason}"
        fams = ",".join(b.families) if b.available else ""
        print(f"  {b.name:18s} {b.tier:12s} {','.join(b.devices):10s} {fams:24s} {state}")
    return 0


def _info_support(args) -> int:
    from . import support
    from .tables import isatty

    devices = (args.device.split(":")[0],) if args.device else support.DEVICES
    rows = support.support_rows(devices)
    if args.json:
        print(json.dumps([{**r.__dict__} for r in rows], indent=1))
        return 0
    sys.stdout.write(support.render(rows, "md" if args.md else "terminal", color=isatty()))
    return 0


# ---------------------------------------------------------------------------------------------------
# report / compare / plot


def _results_arg(p):
    p.add_argument("results", nargs="+", type=Path,
                   help="result files: pytest-benchmark JSON (--benchmark-json / autosave) or a journal (.jsonl)")


def _load(paths):
    from .harness.results import ResultFileError, load_many

    try:
        return load_many(paths)
    except ResultFileError as e:
        raise CliError(str(e)) from None


_STDOUT = Path("-")


def _add_report(sub):
    p = sub.add_parser("report", help="speedup tables: against native and the best vendor backend, with geomeans",
                       description="Speedup tables of result files: per device, family, dtype and shape, each "
                                   "backend's throughput, % of peak and speedup (×) over native and over the "
                                   "best vendor backend (penalty = 1 − speedup); the geometric mean over shapes "
                                   "per device, family and backend; differences inside the noise are marked (~).")
    _results_arg(p)
    p.add_argument("--format", choices=("terminal", "md", "csv"), default="terminal",
                   help="what to print (default: terminal tables; colour only on a terminal)")
    p.add_argument("--md", type=Path, nargs="?", const=_STDOUT, default=None, metavar="FILE",
                   help="write the Markdown report to FILE; --md alone prints it instead of the terminal tables")
    p.add_argument("--csv", type=Path, help="also write the CSV table here (one column per shape parameter)")
    p.set_defaults(func=cmd_report)


def _write(path: Path | None, text: str):
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _failures(paths) -> list[dict]:
    from .harness.results import ResultFileError, load_failures

    out = []
    for p in paths:
        try:
            out += load_failures(p)
        except ResultFileError as e:
            raise CliError(str(e)) from None
    return out


def cmd_report(args) -> int:
    from . import report

    for opt, path in (("--md", args.md), ("--csv", args.csv)):
        if path is not None and path != _STDOUT and path.suffix in (".json", ".jsonl"):
            # `report --md a.json b.json` would take a.json as the Markdown file: never overwrite results
            raise CliError(f"{opt} {path}: refusing to write over a result file; give {opt} a .md/.csv name, or put "
                           "a bare --md after the result files to print Markdown")
    recs = _load(args.results)
    fails = _failures(args.results)  # crashed / hung cases: no timing, listed as failed with the reason
    fmt = "md" if args.md == _STDOUT else args.format
    sys.stdout.write(report.render(recs, fmt) + report.failures_text(fails, fmt))
    _write(None if args.md == _STDOUT else args.md, report.render(recs, "md") + report.failures_text(fails, "md"))
    _write(args.csv, report.render(recs, "csv"))
    return 0


def _add_compare(sub):
    p = sub.add_parser("compare", help="runs or machines side by side: summary, FASTER/SLOWER/SAME, CI exit code",
                       description="One column per result file (a run, or a machine); each column after the first "
                                   "is compared with the first: FASTER/SLOWER when the p20-p80 ranges of the two "
                                   "medians are disjoint, SAME when they overlap. Prints a summary first (per "
                                   "family and backend: geometric-mean speedup, counts of FASTER/SLOWER/SAME), "
                                   "then only the rows that changed.",
                       epilog="Exit status: 0; 1 with --fail-on-slower when a case is SLOWER by more than PCT "
                              "percent of throughput; 2 usage error or unreadable file.")
    _results_arg(p)
    p.add_argument("--label", action="append", default=[], help="column label per file (default: the device name)")
    p.add_argument("--format", choices=("terminal", "md", "csv"), default="terminal")
    p.add_argument("--all", action="store_true", help="list every row, not only the changed ones")
    p.add_argument("--fail-on-slower", type=float, default=None, metavar="PCT",
                   help="exit 1 when any case is SLOWER (outside the noise) than in the first file by more than PCT "
                        "percent of throughput (CI: --fail-on-slower 5)")
    p.add_argument("--out", type=Path, help="also write the output here")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from . import report
    from .harness.results import ResultFileError, load

    if len(args.results) < 2:
        raise CliError("compare needs at least two result files")
    if args.label and len(args.label) != len(args.results):
        raise CliError(f"--label given {len(args.label)} times for {len(args.results)} files")
    runs = []
    for i, path in enumerate(args.results):
        try:
            recs = load(path)
        except ResultFileError as e:
            raise CliError(str(e)) from None
        label = args.label[i] if args.label else f"{recs[0].machine} [{path.name}]"
        runs.append((label, recs))
    if args.fail_on_slower is not None and not 0 <= args.fail_on_slower < 100:
        raise CliError(f"--fail-on-slower: a percentage in [0, 100), got {args.fail_on_slower:g}")
    text = report.compare_text(runs, args.format, show_all=args.all)
    sys.stdout.write(text)
    _write(args.out, report.compare_text(runs, args.format, show_all=args.all, color=False))
    if args.fail_on_slower is not None:
        bad = report.regressions(report.compare_runs(runs), args.fail_on_slower)
        if bad:
            worst = sorted(bad, key=lambda t: t[2])[:5]
            print(f"pykernels compare: {len(bad)} case(s) slower by more than {args.fail_on_slower:g}%: "
                  + "; ".join(f"{r.backend} {r.family} {r.dtype} {r.shape} {report.fmt_speedup(x)} in {runs[i][0]}"
                              for r, i, x in worst), file=sys.stderr)
            return 1
    return 0


def _add_tune(sub):
    p = sub.add_parser("tune", help="measure the native CPU kernels' run-time settings on this machine and cache the best",
                       description="Time decode's K/V software-prefetch settings (L1/L2 per query-head grouping, a second "
                                   "near prefetch, the distance), its tokens per step on a paged cache, and the GEMV's "
                                   "rows of B per step (M = 1) on this "
                                   "machine, in turns with the native read probe, "
                                   "and cache the best per machine and thread count beside the peaks; the native "
                                   "backend applies it when it loads (PYKERNELS_CPU_PREFETCH*, _PAGED_STEP and _GEMV_STREAMS win; "
                                   "PYKERNELS_CPU_TUNING=off ignores the cache). docs/harness.md, \"Tuning\".")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="pin torch, the BLAS/OpenMP pools and the native kernels to N threads (the tuning is kept per "
                        "thread count)")
    p.add_argument("--budget", type=float, default=1.5, metavar="S", help="seconds of timing per row and stage (24 in all)")
    p.add_argument("--rounds", type=int, default=6, metavar="N", help="rounds per row and stage, at least")
    p.add_argument("--show", action="store_true", help="print this machine's cached tuning and what is in force; measure nothing")
    p.add_argument("--clear", action="store_true", help="delete this machine's cached tuning (the defaults apply again)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, but do not cache")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the record (JSON) to FILE")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: small rows, not a tuning
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from .backends.native import _ext
    from .harness import threads, tune

    try:
        if args.threads is not None:
            threads.pin_threads(args.threads)
    except (TypeError, ValueError) as e:
        raise CliError(f"--threads: {e}") from None
    if args.budget <= 0 or args.rounds < 1:
        raise CliError("--budget must be > 0 and --rounds >= 1")
    path = tune.cache_path()
    if args.show or args.clear:
        data = tune.load()
        if args.clear:
            path.unlink(missing_ok=True)
            print(f"removed {path}" if data else f"no cached tuning at {path}")
            return 0
        print(json.dumps(data, indent=1) if data else f"no cached tuning at {path}")
        print("in force:", json.dumps(tune.current(_ext())))
        return 0
    try:
        rec = tune.measure(budget_s=args.budget, rounds=args.rounds,
                           **({"B": 2, "L": 512, "gemv_k": (1024,)} if args.quick else {}))
    except RuntimeError as e:
        raise CliError(str(e)) from None
    b, c = rec["baseline"], rec["settings"]
    print(f"chosen: decode prefetch level {c['level']}, near {'on' if c['near'] else 'off'}, distance "
          f"{c['distance'] // 1024} KB (before: {b['level']}, near {'on' if b['near'] else 'off'}, "
          f"{b['distance'] // 1024} KB, from {b['sources']['level']!r}): {100 * (rec['gain']['decode'] - 1):+.1f}% of the read "
          f"bandwidth, geometric mean over {len(rec['rows'])} rows; paged step {c['paged_step']} tokens (before: "
          f"{b['paged_step']}, from {b['sources']['paged_step']!r}): {100 * (rec['gain']['paged_step'] - 1):+.1f}% over the "
          f"paged rows; GEMV rows per step {c['gemv_streams']} (before: "
          f"{b['gemv_streams']}, from {b['sources']['gemv_streams']!r}): {100 * (rec['gain']['gemv'] - 1):+.1f}% over "
          f"{len(rec['gemv_rows'])} rows; a change needs +{100 * rec['margin']:.0f}%")
    rec["command"] = (f"pykernels tune --budget {args.budget} --rounds {args.rounds}"
                      + (f" --threads {args.threads}" if args.threads is not None else ""))
    if args.out:
        _write(args.out, json.dumps(rec, indent=1) + "\n")
    if args.dry_run or args.quick:
        return 0
    saved = tune.save(rec)
    tune.apply(_ext(), c, f"pykernels tune ({rec['measured_at']}, {saved})")
    print(f"cached in {saved}: the native backend applies it from now on")
    return 0


def _add_plot(sub):
    p = sub.add_parser("plot", help="PNG charts: a roofline per device and penalty bars per family",
                       description="Write PNGs: a roofline per device (each backend's points against the measured "
                                   "peaks) and penalty bars per family against native and the best vendor backend.")
    _results_arg(p)
    p.add_argument("--out", type=Path, default=Path("plots"), help="output directory (default ./plots)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from . import report

    recs = _load(args.results)
    try:
        paths = report.plot_all(recs, args.out)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write plots to {args.out}: {e.strerror or e}") from None
    for p in paths:
        print(p)
    return 0


# ---------------------------------------------------------------------------------------------------
# registration


# name -> a function here that adds the subparser, or "module:attr" of one (imported when the CLI starts;
# a module that fails to import leaves its subcommand out with a note in --help).
SUBCOMMANDS: dict[str, object] = {
    "bench": _add_bench,
    "info": _add_info,
    "report": _add_report,
    "compare": _add_compare,
    "plot": _add_plot,
    "tune": _add_tune,
    "validate": "pykernels.validate:add_parser",
    "tokens": "pykernels.tokens.metering:add_parser",
    "layer": "pykernels.tokens.layer:add_parser",
    "fleet": "pykernels.fleet:add_parser",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pykernels", description="pykernels: the abstraction penalty of kernel "
                                 "backends. The benchmarks: `pykernels bench` (see docs/harness.md).")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"pykernels {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    broken = []
    for name, adder in SUBCOMMANDS.items():
        if isinstance(adder, str):
            mod, _, attr = adder.partition(":")
            try:
                adder = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                broken.append(f"{name} ({type(e).__name__}: {e})")
                continue
        adder(sub)
    if broken:
        ap.epilog = "unavailable subcommands: " + "; ".join(broken)
    return ap


# Subcommands that read result files: whatever a file holds, they end with one line and exit 2, never a
# traceback (the loaders check what they use; this is the net under them for content nobody foresaw).
READERS = ("report", "compare", "plot", "tokens")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"pykernels {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, OverflowError) as e:
        if args.command not in READERS:
            raise
        files = ", ".join(str(p) for p in getattr(args, "results", []) or [])
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        print(f"pykernels {args.command}: cannot use the result file(s) {files}: {type(e).__name__}"
              + (f": {msg}" if msg else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pykernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
