"""`pykernels validate`: the conformance run a hardware vendor publishes for a backend (a port).

correctness (every family x supported dtype x an odd-shape matrix, against the float64 reference with
the dtype-aware tolerance), robustness (crashes in a worker process fail one case; NaN/Inf propagate;
determinism; bad input rejected; edge shapes called directly), performance (a fixed shape set against
every other available backend on the device), and a JSON + Markdown report with an environment
manifest, a SHA-256 of the result data and a verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from .cases import case_id, correctness_cases, parameter_cases, perf_cases, robustness_cases
from .runner import Worker
from .worker import CHECKS, FAIL, PASS, UNSUPPORTED

SCHEMA = "pykernels.validate/1"


def _manifest(device: str, command: str) -> dict:
    man = {"command": command, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "python": platform.python_version(), "platform": platform.platform()}
    try:
        from ..harness.device import fingerprint

        man["device"] = fingerprint(device)
    except Exception as e:  # noqa: BLE001 - the report says what it could not read
        man["device"] = {"error": f"fingerprint unavailable: {type(e).__name__}: {e}"}
    return man


def run_validation(backend: str, device: str = "cpu", *, plugins=(), perf: bool = True, quick: bool = False,
                   case_timeout: float = 300.0, perf_budget_s: float = 1.0, command: str = "",
                   progress=None, families=None, start=None) -> dict:
    """Run the conformance matrix for `backend` on `device` and return the report as a dict
    (`families`: only these kernel families; default all). `progress(row)` after each case;
    `start(phase, what, total)` before each (the live progress of `pykernels validate`)."""
    cases = correctness_cases() + parameter_cases() + robustness_cases()
    if families:
        cases = [c for c in cases if c["family"] in families]
    if quick:  # a smaller matrix for tests: every family and kind, fewer shapes
        seen, keep = set(), []
        for c in cases:
            # correctness: one shape per family and dtype; parameter cases: one per API parameter
            key = (c["kind"], c["family"], c["dtype"], (c.get("covers") or [""])[0])
            if key not in seen or c["kind"] not in ("correctness", "parameter"):
                seen.add(key)
                keep.append(c)
        cases = keep
    for i, c in enumerate(cases):
        c["id"] = i
        c["seed"] = i
    w = Worker(backend, device, plugins, case_timeout)
    results = []
    try:
        for c in cases:
            if start:
                start("cases", case_id(c), len(cases))
            r = w.run(c)
            row = {"case": case_id(c), "kind": c["kind"], "family": c["family"], "dtype": c["dtype"],
                   "params": c["params"], **{k: v for k, v in r.items() if k not in ("id", "traceback")}}
            results.append(row)
            if progress:
                progress(row)
            if w.start_error and r.get("detail") == w.start_error:
                break  # the backend cannot even be loaded: every case would fail the same way
    finally:
        restarts = w.restarts
        w.close()

    performance = _performance(backend, device, plugins, perf_budget_s, case_timeout, families, start) if perf else []

    failed = [r for r in results if r["status"] == FAIL]
    # A wrong answer after timing (the anti-cheat recheck) fails the port like any other case.
    failed += [dict(p, kind="perf", family=p["case"].split(":")[1]) for p in performance if p["status"] == FAIL]
    by_check: dict[str, list[str]] = {}
    for r in failed:
        by_check.setdefault(r.get("check") or "unknown", []).append(r["case"])
    unsupported = sorted({(r["family"], r["dtype"]) for r in results if r["status"] == UNSUPPORTED})
    nondet = [r["case"] for r in results if r.get("deterministic") is False]
    data = {"cases": results, "performance": performance}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    order = {FAIL: 0, PASS: 1, UNSUPPORTED: 2}
    results.sort(key=lambda r: order.get(r["status"], 3))
    return {
        "schema": SCHEMA,
        "backend": backend,
        "device": device,
        "quick": quick,
        "perf": perf,
        "verdict": "conformant" if not failed and any(r["status"] == PASS for r in results) else "not conformant",
        "summary": {"cases": len(results), "passed": sum(r["status"] == PASS for r in results),
                    "failed": len(failed), "unsupported": sum(r["status"] == UNSUPPORTED for r in results),
                    "worker_restarts": restarts, "deterministic": not nondet},
        "failing_cases": [r["case"] for r in failed],
        "failures_by_check": {k: {"what": CHECKS.get(k, ""), "count": len(v), "cases": v}
                              for k, v in sorted(by_check.items(), key=lambda kv: -len(kv[1]))},
        "unsupported": [f"{f} {d}" for f, d in unsupported],
        "nondeterministic_cases": nondet,
        "warnings": [f"{r['case']}: {r['warning']}" for r in results if r.get("warning")],
        "manifest": _manifest(device, command),
        "sha256": digest,
        **data,
    }


def _performance(backend: str, device: str, plugins, budget_s: float, case_timeout: float,
                 families=None, start=None) -> list[dict]:
    """Throughput of `backend` and of every other available backend on `device` on the fixed shapes."""
    from ..backends import registry

    names = [backend] + [b.name for b in registry.backends()
                         if b.available and b.name != backend and device in b.devices
                         and b.name != "triton_interpret"]
    rows: dict[str, dict[str, dict]] = {}
    pcases = [c for c in perf_cases() if not families or c["family"] in families]
    for name in names:
        w = Worker(name, device, plugins, case_timeout)
        try:
            for i, c in enumerate(pcases):
                c = dict(c, id=i, seed=0, budget_s=budget_s, recheck=name == backend)
                if start:
                    start("performance", f"{name} {case_id(c)}", len(names) * len(pcases))
                r = w.run(c)
                rows.setdefault(case_id(c), {})[name] = r
        finally:
            w.close()
    out = []
    for cid, per in rows.items():
        mine = per.get(backend, {})
        entry = {"case": cid, "backend": backend, "status": mine.get("status"), "detail": mine.get("detail", ""),
                 "check": mine.get("check"), "checked": mine.get("checked"),
                 "median_s": mine.get("median_s"), "tflops": mine.get("tflops"), "gbps": mine.get("gbps"),
                 "pct_of_peak": mine.get("pct_of_peak"), "penalty_vs": {}, "speedup_vs": {},
                 "prepare_s": mine.get("prepare_s")}
        for other, r in per.items():
            if other == backend or r.get("status") != PASS or not r.get("median_s") or not mine.get("median_s"):
                continue
            # speedup(X over Y) = throughput(X) / throughput(Y) = t(Y) / t(X); penalty = 1 - speedup
            entry["speedup_vs"][other] = r["median_s"] / mine["median_s"]
            entry["penalty_vs"][other] = 1.0 - r["median_s"] / mine["median_s"]
        out.append(entry)
    return out


def to_markdown(rep: dict) -> str:
    s = rep["summary"]
    lines = [f"# Conformance: backend `{rep['backend']}` on {rep['device']}", "",
             (f"**Verdict: {rep['verdict'].upper()}** ({scope_of(rep)}) — {s['passed']} passed, {s['failed']} "
              f"failed, {s['unsupported']} unsupported of {s['cases']} cases; worker restarts after crashes: "
              f"{s['worker_restarts']}; deterministic: {'yes' if s['deterministic'] else 'no'}."), ""]
    if rep["failing_cases"]:
        lines += ["## Failures by check", "", "| check | what it requires | failing cases |", "| --- | --- | ---: |"]
        lines += [f"| {k} | {v['what']} | {v['count']} |" for k, v in rep.get("failures_by_check", {}).items()]
        lines += ["", "## Failing cases", "", "| case | check | detail |", "| --- | --- | --- |"]
        lines += [f"| `{r['case']}` | {r.get('check', '')} | {r.get('detail', '')} |" for r in rep["cases"]
                  if r["status"] == FAIL]
        lines += [f"| `{p['case']}` (performance) | {p.get('check', '')} | {p.get('detail', '')} |"
                  for p in rep["performance"] if p["status"] == FAIL]
        lines.append("")
    if rep["warnings"]:
        lines += ["## Warnings (not failures)", ""] + [f"- {w}" for w in rep["warnings"]] + [""]
    if rep["unsupported"]:
        lines += ["## Unsupported (not counted as failures)", "", ", ".join(rep["unsupported"]), ""]
    if rep["performance"]:
        lines += _performance_markdown(rep)
    lines += ["## All cases", "", "| case | status | error | tolerance | detail |", "| --- | --- | ---: | ---: | --- |"]
    for r in rep["cases"]:
        e, t = r.get("error"), r.get("tolerance")
        lines.append(f"| `{r['case']}` | {r['status']} | {'' if e is None else f'{e:.2e}'} | "
                     f"{'' if t is None else f'{t:.2e}'} | {r.get('detail', '')} |")
    m = rep["manifest"]
    lines += ["", "## Environment", "", f"- command: `{m['command']}`", f"- time (UTC): {m['time_utc']}",
              f"- python {m['python']} on {m['platform']}",
              f"- device: `{json.dumps(m['device'], sort_keys=True, default=str)}`",
              f"- SHA-256 of the result data (cases + performance): `{rep['sha256']}`", ""]
    return "\n".join(lines)


def speedups_of(p: dict) -> dict:
    """Speedup of the validated backend over each other backend on one performance case (reports written
    before speedup_vs existed carry only penalty_vs = 1 - speedup)."""
    if p.get("speedup_vs"):
        return p["speedup_vs"]
    return {o: 1.0 - v for o, v in (p.get("penalty_vs") or {}).items()}


def _performance_markdown(rep: dict) -> list[str]:
    from ..tables import fmt_speedup, geomean

    perf = rep["performance"]
    others = sorted({o for p in perf for o in speedups_of(p)})
    lines = ["## Performance", "",
             (f"Speedup of `{rep['backend']}` over each other backend = throughput({rep['backend']}) / "
              "throughput(other) (×; above 1: faster); penalty = 1 − speedup. The last row is the geometric mean "
              "over the cases both ran."), "",
             "| case | status | median | TFLOP/s | GB/s | % peak | " + " | ".join(f"over {o}" for o in others) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(others)]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "—"

    for p in perf:
        sp = speedups_of(p)
        cells = " | ".join(fmt_speedup(sp.get(o)) for o in others)
        lines.append(f"| `{p['case']}` | {p['status'] or '—'} | {f(p['median_s'] and p['median_s'] * 1e3, '.3f')} ms | "
                     f"{f(p['tflops'], '.3f')} | {f(p['gbps'], '.1f')} | {f(p['pct_of_peak'], '.1f')} | {cells} |")
    geo = []
    for o in others:
        vals = [speedups_of(p)[o] for p in perf if o in speedups_of(p)]
        g = geomean(vals) if vals else None
        geo.append(f"**{fmt_speedup(g)}** ({len(vals)} cases)" if g else "—")
    lines.append("| **geometric mean** | | | | | | " + " | ".join(geo) + " |")
    lines.append("")
    return lines


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="conformance run of one backend: correctness, robustness, performance",
                       description="Run the conformance suite for one backend and write a JSON + Markdown report. "
                                   "Exit code 0 when conformant, 1 when not, 2 on a usage error.")
    p.add_argument("--backend", required=True, help="backend name (built-in or plugin)")
    p.add_argument("--device", default="cpu", help="device type: cpu (default) or cuda")
    p.add_argument("--out", default=None, help="directory for validate-<backend>-<device>.json/.md")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE:ATTR",
                   help="load an extra backend class for this run (repeatable)")
    p.add_argument("--no-perf", action="store_true", help="skip the performance section")
    p.add_argument("--quick", action="store_true", help="a reduced shape matrix (every family and kind)")
    p.add_argument("--case-timeout", type=float, default=300.0, help="seconds before a case counts as a hang")
    p.add_argument("--perf-budget", type=float, default=1.0, metavar="S",
                   help="seconds of timing per backend and performance case (default 1)")
    p.set_defaults(func=cmd_validate)


def _usage_problem(args) -> str | None:
    """A usage error of `validate` (exit 2, one line) rather than a NOT CONFORMANT verdict."""
    from ..backends import registry
    from ..harness.device import device_problem

    why = device_problem(args.device)
    if why:
        return f"--device: {why}"
    if args.plugin:
        return None  # the plugin's backend is loaded in the worker; its errors are the backend's
    known = registry.all_backends()
    if args.backend not in known:
        return f"--backend: unknown backend {args.backend!r}; known: {', '.join(sorted(known))}"
    info = registry.info(known[args.backend])
    if not info.available:
        return f"--backend: {args.backend} is unavailable here: {info.reason}"
    return None


def scope_of(rep: dict) -> str:
    """'full', or what a partial run left out (quick matrix, no performance section)."""
    parts = [p for p, on in (("quick matrix", rep.get("quick")), ("no performance section", not rep.get("perf", True)))
             if on]
    return "partial: " + ", ".join(parts) if parts else "full"


def cmd_validate(args) -> int:
    command = "pykernels " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    why = _usage_problem(args)
    if why:
        print(f"pykernels validate: {why}", file=sys.stderr)
        return 2

    from ..tables import Progress

    bars: dict = {}

    def start(phase, what, total):  # which case, how many left, elapsed, estimated time left (stderr)
        if phase not in bars:
            for b in bars.values():
                b.close()
            bars[phase] = Progress(total, label=f"validate {args.backend} ({phase})")
        bars[phase].step(what)

    def progress(row):
        if row["status"] == FAIL:
            msg = f"FAIL {row['case']}: {row.get('detail', '')}"
            if bars:
                list(bars.values())[-1].note(msg)
            else:
                print(msg, file=sys.stderr)

    rep = run_validation(args.backend, args.device, plugins=args.plugin, perf=not args.no_perf, quick=args.quick,
                         case_timeout=args.case_timeout, perf_budget_s=args.perf_budget, command=command,
                         progress=progress, start=start)
    for b in bars.values():
        b.close()
    md = to_markdown(rep)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"validate-{args.backend}-{args.device}"
        stem.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.json and {stem}.md")
    s = rep["summary"]
    print(f"{args.backend} on {args.device}: {rep['verdict'].upper()} [{scope_of(rep)}] ({s['passed']} passed, {s['failed']} failed, "
          f"{s['unsupported']} unsupported, {s['worker_restarts']} worker restarts)")
    for k, v in rep["failures_by_check"].items():
        print(f"  {v['count']} failed the check {k!r} ({v['what']})")
    for c in rep["failing_cases"][:20]:
        print(f"  FAIL {c}")
    return 0 if rep["verdict"] == "conformant" else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykernels.validate")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
