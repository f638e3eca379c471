"""Speedup tables (terminal, Markdown, CSV), geometric means, cross-run comparison with noise verdicts, plots.

One convention everywhere: the speedup of X over a reference, throughput(X) / throughput(ref) = t(ref) / t(X)
for the same problem, printed as `1.23×`, with its penalty ("tax") 1 − speedup = 1 − throughput(X) /
throughput(ref) (docs/design.md; negative: X is faster) beside it where a percentage is wanted.
Reported against `native` and against the best vendor backend (the vendor-tier backend with the lowest
median on that case), and summarised per device, family and backend as the geometric mean over shapes.

Noise rule: each median comes with its p20..p80 range over the timed samples. Two results whose ranges
overlap are "within noise": the penalty is printed in parentheses with a "~" and counts as no difference;
compare's verdict is SAME. Only disjoint ranges give a penalty / FASTER / SLOWER.

matplotlib is imported only by the plot functions.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .harness.results import PROBE_ERROR_PCT, Record
from .tables import fmt_penalty, fmt_speedup, geomean, isatty, markdown, natural_key, table

FASTER, SLOWER, SAME = "FASTER", "SLOWER", "SAME"
COMPUTE_UNIT = {"gemm": "flops", "attention": "flops", "decode": "bytes"}


# ---------------------------------------------------------------------------------------------------
# arithmetic


def penalty(t_x: float, t_ref: float) -> float:
    """1 - thr(X)/thr(ref) with thr = work / time, for the same work: 1 - t_ref / t_x."""
    if t_x <= 0 or t_ref <= 0:
        raise ValueError("times must be positive")
    return 1.0 - t_ref / t_x


def overlaps(a_lo: float, a_hi: float, b_lo: float, b_hi: float) -> bool:
    return a_lo <= b_hi and b_lo <= a_hi


def within_noise(x: Record, y: Record) -> bool:
    """True when the p20..p80 ranges of the two medians overlap."""
    return overlaps(x.p20_s, x.p80_s, y.p20_s, y.p80_s)


def verdict(new: Record, old: Record) -> str:
    """FASTER / SLOWER (new against old) when the p20..p80 ranges are disjoint, else SAME."""
    if within_noise(new, old):
        return SAME
    return FASTER if new.median_s < old.median_s else SLOWER


@dataclass(frozen=True)
class Penalty:
    value: float        # 1 - thr(X)/thr(ref)
    noise: bool         # inside the measured noise
    ref_backend: str

    @property
    def speedup(self) -> float:
        """thr(X) / thr(ref) = 1 - penalty."""
        return 1.0 - self.value

    def text(self) -> str:
        return fmt_speedup(self.speedup, self.noise)


@dataclass(frozen=True)
class Row:
    rec: Record
    vs_native: Penalty | None
    vs_vendor: Penalty | None
    best_vendor: str | None

    @property
    def ok(self) -> bool:
        return self.rec.ok is not False


def _penalty(x: Record, ref: Record | None) -> Penalty | None:
    if ref is None:
        return None
    return Penalty(penalty(x.median_s, ref.median_s), within_noise(x, ref), ref.backend)


def penalty_rows(records: list[Record]) -> list[Row]:
    """One row per (case, backend), sorted by machine, family, dtype, shape, tier, backend. A result whose
    output failed the check (ok False) is listed but is never a reference and gets no penalty."""
    by_case: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        by_case[r.case].append(r)
    rows = []
    tier_order = {"native": 0, "vendor": 1, "abstraction": 2}
    for case in sorted(by_case, key=lambda c: (c[0], ("gemm", "attention", "decode").index(c[1])
                                               if c[1] in ("gemm", "attention", "decode") else 9, c[2],
                                               natural_key(c[3]))):
        recs = by_case[case]
        good = [r for r in recs if r.ok is not False]
        native = next((r for r in good if r.backend == "native"), None)
        vendors = [r for r in good if r.tier == "vendor"]
        best_vendor = min(vendors, key=lambda r: r.median_s) if vendors else None
        for r in sorted(recs, key=lambda r: (tier_order.get(r.tier, 9), r.backend)):
            if r.ok is False:
                rows.append(Row(r, None, None, best_vendor.backend if best_vendor else None))
                continue
            rows.append(Row(r, None if r is native else _penalty(r, native),
                            None if r is best_vendor else _penalty(r, best_vendor),
                            best_vendor.backend if best_vendor else None))
    return rows


# ---------------------------------------------------------------------------------------------------
# formatting


def fmt_rate(x: float, unit: str) -> str:
    """1.23e11 FLOP/s -> '123 GFLOP/s'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.3g} {prefix}{unit}" if v < 100 else f"{v:.0f} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def fmt_time(s: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def throughput_text(r: Record) -> str:
    if COMPUTE_UNIT.get(r.family) == "bytes":
        return fmt_rate(r.bytes_per_s, "B/s")
    return fmt_rate(r.flops_per_s, "FLOP/s")


# A result above PROBE_ERROR_PCT % of the hardware peak means the peak probe under-measured the hardware (3% of
# slack for clock and timer noise); it is flagged, never printed as a plain number (pct_text).

def pct_text(r: Record) -> str:
    """The '% of peak' cell: above PROBE_ERROR_PCT it is a probe error (the peak is wrong, not the kernel),
    except a memory-bound figure of warm inputs that the last-level cache held ("in cache": the caches read
    faster than the DRAM probe, results.warm_cache_level)."""
    if r.pct_roofline is None:
        return ""
    pct = f"{r.pct_roofline:.0f}%"
    if r.pct_roofline > PROBE_ERROR_PCT:
        return pct + (" (in cache)" if r.cache and r.bound == "memory" else " PROBE ERROR")
    return pct


COLUMNS = ("device", "family", "dtype", "shape", "backend", "tier", "median", "p20-p80", "throughput",
           "% of peak", "vs native", "vs best vendor")


def _cells(row: Row) -> list[str]:
    r = row.rec
    if not row.ok:
        err = "inf" if r.max_error is None or r.max_error == math.inf else f"{r.max_error:.2g}"
        status = f"WRONG (error {err})"
        return [r.machine, r.family, r.dtype, r.shape, r.backend, r.tier, fmt_time(r.median_s), "", status, "", "",
                ""]
    pct = pct_text(r)
    med = fmt_time(r.median_s) + (" (!)" if r.warning else "")
    vn = row.vs_native.text() if row.vs_native else ("ref" if r.backend == "native" else "-")
    vv = row.vs_vendor.text() if row.vs_vendor else ("best" if r.backend == row.best_vendor else "-")
    if row.vs_vendor and r.tier == "vendor":
        vv += f" vs {row.best_vendor}"
    return [r.machine, r.family, r.dtype, r.shape, r.backend, r.tier, med,
            f"{fmt_time(r.p20_s)}-{fmt_time(r.p80_s)}", throughput_text(r), pct, vn, vv]


LEGEND = ("speedup = throughput(X) / throughput(ref) (×); penalty = 1 - speedup (negative = X faster); "
          "(~1.02×) = within noise (p20-p80 ranges overlap); % of peak = of the roofline bound from the measured peaks "
          "(of the compute peak alone where warm inputs fit one core's L2; (in cache) = above the DRAM bound, read from "
          "the last-level cache)")


def _style(row: Row, p: Penalty | None) -> str:
    """Colour of a speedup cell (used on a terminal only): green faster, red slower, dim within noise."""
    if p is None:
        return ""
    if p.noise:
        return "dim"
    return "green" if p.speedup > 1 else "red"


def table_terminal(rows: list[Row], color: bool | None = None) -> str:
    """One table per (device, family), a rule between cases, shapes in natural order; then the peaks, the
    geometric-mean summary (last, so that it stays on screen) and the legend. Colour only on a terminal
    (color=None: when stdout is one)."""
    color = isatty() if color is None else color
    out = []
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.rec.machine, row.rec.family), []).append(row)
    for (machine, fam), rs in groups.items():
        body, cuts, last = [], [], None
        for row in rs:
            c = _cells(row)
            if tuple(c[:4]) != last:
                cuts.append(len(body))
                last = tuple(c[:4])
            cells = [c[2], c[3]] + c[4:]
            if not row.ok:
                cells[COLUMNS.index("throughput") - 2] = (cells[COLUMNS.index("throughput") - 2], "bold red")
            cells[-2] = (cells[-2], _style(row, row.vs_native))
            cells[-1] = (cells[-1], _style(row, row.vs_vendor))
            body.append(cells)
        out.append(table(COLUMNS[2:], body, "llll" + "l" * 2 + "rrrr" + "rr", title=f"{fam} — {machine}",
                         color=color, sections=cuts))
    summary = geomean_rows(rows)
    if summary:
        out.append(table(SUMMARY_COLUMNS, [_summary_cells(g, color) for g in summary], SUMMARY_ALIGN,
                         title="geometric mean over shapes (per device, family, backend)", color=color))
    return "\n".join(out) + "\n".join(["", *peaks_lines(rows), LEGEND]) + "\n"


# ---------------------------------------------------------------------------------------------------
# geometric means over shapes


@dataclass(frozen=True)
class Geomean:
    machine: str
    family: str
    backend: str
    tier: str
    cases: int                   # ranked cases (correct answers) of this backend
    vs_native: float | None      # geometric mean of the speedups over native (None: no case with native)
    native_counts: tuple         # (faster, slower, within noise) against native
    vs_vendor: float | None      # geometric mean of the speedups over the best vendor backend
    vendor_counts: tuple
    wrong: int = 0               # cases with a wrong answer (never ranked)


def _counts(ps: list[Penalty]) -> tuple:
    return (sum(1 for p in ps if not p.noise and p.speedup > 1), sum(1 for p in ps if not p.noise and p.speedup < 1),
            sum(1 for p in ps if p.noise or p.speedup == 1))


def geomean_rows(rows: list[Row]) -> list[Geomean]:
    """Per (device, family, backend): the geometric mean over its cases (shapes and dtypes) of the speedup over
    native and over the best vendor backend, with how many were faster, slower and within noise. A case
    without that reference (or a wrong answer) does not enter the mean."""
    by: dict[tuple, list[Row]] = {}
    for row in rows:
        by.setdefault((row.rec.machine, row.rec.family, row.rec.backend), []).append(row)
    fam_order = {"gemm": 0, "attention": 1, "decode": 2}
    tier_order = {"native": 0, "vendor": 1, "abstraction": 2}
    out = []
    for (machine, fam, backend), rs in by.items():
        good = [r for r in rs if r.ok]
        vn = [r.vs_native for r in good if r.vs_native is not None]
        # the best vendor backend of a case is its own reference there: 1x, counted as "same"
        vv = [r.vs_vendor if r.vs_vendor is not None else Penalty(0.0, True, backend) for r in good
              if r.vs_vendor is not None or r.best_vendor == backend]
        out.append(Geomean(machine, fam, backend, rs[0].rec.tier, len(good),
                           geomean(p.speedup for p in vn) if vn else None, _counts(vn),
                           geomean(p.speedup for p in vv) if vv else None, _counts(vv), len(rs) - len(good)))
    out.sort(key=lambda g: (g.machine, fam_order.get(g.family, 9), tier_order.get(g.tier, 9), g.backend))
    return out


SUMMARY_COLUMNS = ("device", "family", "backend", "tier", "cases", "vs native (geomean)", "penalty",
                   "faster/slower/same", "vs best vendor (geomean)", "penalty", "faster/slower/same")
SUMMARY_ALIGN = "llllrrrrrrr"


def _summary_cells(g: Geomean, color: bool = False) -> list:
    def sp(v, counts, ref):
        if g.backend == ref:
            return ["ref", "", ""]
        if v is None:
            return ["—", "", ""]
        style = "green" if v > 1 and counts[0] > counts[1] else "red" if v < 1 and counts[1] > counts[0] else ""
        return [(fmt_speedup(v), style), fmt_penalty(v), "/".join(map(str, counts))]

    cases = f"{g.cases}" + (f" (+{g.wrong} wrong)" if g.wrong else "")
    return [g.machine, g.family, g.backend, g.tier, cases, *sp(g.vs_native, g.native_counts, "native"),
            *sp(g.vs_vendor, g.vendor_counts, None)]


def summary_markdown(rows: list[Row]) -> str:
    return markdown(SUMMARY_COLUMNS, [_summary_cells(g) for g in geomean_rows(rows)], SUMMARY_ALIGN)


def peaks_lines(rows: list[Row]) -> list[str]:
    """Per machine: the peaks the % of peak uses and the copy bandwidth measured in the same run."""
    out = []
    for machine in sorted({r.rec.machine for r in rows}):
        recs = [r.rec for r in rows if r.rec.machine == machine]
        bw = max((r.peak_bw for r in recs if r.peak_bw), default=None)
        pf = {}
        for r in recs:
            if r.peak_flops:
                pf[r.dtype] = r.peak_flops
        copy = [r.copy_bw for r in recs if r.copy_bw]
        parts = []
        if bw:
            parts.append(f"peak bandwidth {fmt_rate(bw, 'B/s')}")
        parts += [f"{dt} hardware peak {fmt_rate(v, 'FLOP/s')}" for dt, v in sorted(pf.items())]
        vc = {r.dtype: r.vendor_ceiling for r in recs if r.vendor_ceiling}
        parts += [f"{dt} vendor ceiling {fmt_rate(v, 'FLOP/s')}" for dt, v in sorted(vc.items())]
        warn = [f"{r.backend} {r.family} {r.dtype} {r.shape}: {r.warning}" for r in recs if r.warning]
        if warn:
            parts.append("(!) implausible samples after re-measuring: " + "; ".join(warn))
        if copy:
            parts.append(f"copy bandwidth measured in the same run {fmt_rate(sorted(copy)[len(copy) // 2], 'B/s')}")
        if parts:
            out.append(f"{machine}: " + "; ".join(parts))
    return out


def table_markdown(rows: list[Row]) -> str:
    """The geometric-mean summary first, then every row, the peaks and the legend."""
    lines = []
    if geomean_rows(rows):
        lines += ["Geometric mean over shapes of the speedup (per device, family, backend):", "",
                  summary_markdown(rows)]
    lines.append(markdown(COLUMNS, [_cells(row) for row in rows], "llllll" + "rrrrrr"))
    lines += [f"- {x}" for x in peaks_lines(rows)]
    lines += ["", ("Speedup = throughput(X) / throughput(reference) (×); penalty = 1 − speedup, negative "
                   "when X is faster. A value in parentheses with ~ is within the measured noise (the p20–p80 "
                   "ranges of the two medians overlap). The geometric mean is over every shape and dtype of the "
                   "family with a correct answer and that reference; faster/slower/same count the cases outside "
                   "and inside the noise. % of peak is the fraction of the roofline bound min(peak FLOP/s, "
                   "intensity × peak bandwidth), with peaks measured on the device.")]
    return "\n".join(lines) + "\n"


# Shape parameters get a column each in the CSV, in this order (then any other, sorted). The decode
# problem's `context` is the L of its label.
PARAM_ORDER = ("M", "N", "K", "B", "Hq", "Hkv", "S", "L", "D", "causal", "paged", "block_size", "ragged")
_PARAM_ALIAS = {"context": "L"}
_LABEL_PART = re.compile(r"^([A-Za-z]+?)(\d+)$")


def shape_params(r: Record) -> dict:
    """The shape parameters of a record: its `params`, else parsed from the label (M64-N64-K64,
    B8-Hq32-Hkv8-L4096-D128-paged16, ...-causal)."""
    if r.params:
        return {_PARAM_ALIAS.get(k, k): v for k, v in r.params.items()}
    out: dict = {}
    for part in r.shape.split("-"):
        m = _LABEL_PART.match(part)
        if part in ("causal", "ragged"):
            out[part] = True
        elif part == "contig":
            out["paged"] = False
        elif m and m.group(1) == "paged":
            out["paged"], out["block_size"] = True, int(m.group(2))
        elif m:
            out[m.group(1)] = int(m.group(2))
    return out


def param_columns(recs) -> list[str]:
    seen = {k for r in recs for k in shape_params(r)}
    return [k for k in PARAM_ORDER if k in seen] + sorted(seen - set(PARAM_ORDER))


CSV_FIELDS = ("device", "family", "dtype", "shape", "backend", "tier", "median_s", "p20_s", "p80_s", "cv",
              "rounds", "flops", "bytes", "flops_per_s", "bytes_per_s", "pct_roofline", "ok", "max_error",
              "speedup_vs_native", "penalty_vs_native", "noise_vs_native", "best_vendor", "speedup_vs_vendor",
              "penalty_vs_vendor", "noise_vs_vendor")


def table_csv(rows: list[Row]) -> str:
    """One line per (case, backend); the shape's parameters (M, N, K, B, Hq, Hkv, S, L, D, ...) get a column
    each after `shape` (empty where a family has no such parameter)."""
    params = param_columns([row.rec for row in rows])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_FIELDS[:4], *params, *CSV_FIELDS[4:]])
    for row in rows:
        r = row.rec
        sp = shape_params(r)
        w.writerow([r.machine, r.family, r.dtype, r.shape, *(_csv_value(sp.get(k)) for k in params),
                    r.backend, r.tier, r.median_s, r.p20_s, r.p80_s, r.cv,
                    r.rounds, r.flops, r.bytes, r.flops_per_s, r.bytes_per_s,
                    "" if r.pct_roofline is None else r.pct_roofline, r.ok, "" if r.max_error is None else r.max_error,
                    "" if row.vs_native is None else row.vs_native.speedup,
                    "" if row.vs_native is None else row.vs_native.value,
                    "" if row.vs_native is None else row.vs_native.noise, row.best_vendor or "",
                    "" if row.vs_vendor is None else row.vs_vendor.speedup,
                    "" if row.vs_vendor is None else row.vs_vendor.value,
                    "" if row.vs_vendor is None else row.vs_vendor.noise])
    return buf.getvalue()


def _csv_value(v) -> object:
    return "" if v is None else int(v) if isinstance(v, bool) else v


def render(records: list[Record], fmt: str, color: bool | None = None) -> str:
    rows = penalty_rows(records)
    if fmt == "terminal":
        return table_terminal(rows, color=color)
    if fmt == "md":
        return table_markdown(rows)
    if fmt == "csv":
        return table_csv(rows)
    raise ValueError(f"unknown format {fmt!r} (terminal, md, csv)")


# ---------------------------------------------------------------------------------------------------
# compare: several runs / machines side by side


@dataclass(frozen=True)
class CompareRow:
    family: str
    dtype: str
    shape: str
    backend: str
    cells: tuple  # per run: Record or None
    verdicts: tuple  # per run after the first: FASTER/SLOWER/SAME against the first run, or None


def compare_runs(runs: list[tuple[str, list[Record]]]) -> list[CompareRow]:
    """Rows of (family, dtype, shape, backend) with one cell per run (the run's label, its records); each run
    after the first gets a verdict against the first. Runs are files; a file with several machines (merged
    results) contributes its first machine per case."""
    keys = []
    index: list[dict] = []
    for _, recs in runs:
        d = {}
        for r in recs:
            k = (r.family, r.dtype, r.shape, r.backend)
            d.setdefault(k, r)
            if k not in keys:
                keys.append(k)
        index.append(d)
    fam_order = {"gemm": 0, "attention": 1, "decode": 2}
    keys.sort(key=lambda k: (fam_order.get(k[0], 9), k[1], natural_key(k[2]), k[3]))
    rows = []
    for k in keys:
        cells = tuple(d.get(k) for d in index)
        base = cells[0]
        verdicts = tuple(None if (base is None or c is None or base.ok is False or c.ok is False) else verdict(c, base)
                         for c in cells[1:])
        rows.append(CompareRow(*k, cells=cells, verdicts=verdicts))
    return rows


def ratio(row: CompareRow, i: int) -> float | None:
    """Speedup of run i (> 0) over the first run for this row: t(first) / t(run i); None without both."""
    base, c = row.cells[0], row.cells[i]
    if base is None or c is None or base.ok is False or c.ok is False:
        return None
    return base.median_s / c.median_s


@dataclass(frozen=True)
class CompareSummary:
    label: str        # the run compared with the first
    family: str
    backend: str
    geomean: float | None   # geometric mean over the shared cases of the speedup over the first run
    faster: int
    slower: int
    same: int
    only_one: int     # cases in one of the two runs only (or a wrong answer in either)


def compare_summary(runs: list[tuple[str, list[Record]]], rows: list[CompareRow] | None = None) -> list[CompareSummary]:
    """Per run after the first, family and backend: the geomean speedup over the first run and the counts."""
    rows = compare_runs(runs) if rows is None else rows
    out = []
    for i, (label, _) in enumerate(runs[1:], 1):
        by: dict[tuple, list[CompareRow]] = {}
        for row in rows:
            by.setdefault((row.family, row.backend), []).append(row)
        fam_order = {"gemm": 0, "attention": 1, "decode": 2}
        for (fam, backend), rs in sorted(by.items(), key=lambda kv: (fam_order.get(kv[0][0], 9), kv[0][1])):
            ratios = [x for x in (ratio(r, i) for r in rs) if x is not None]
            vs = [r.verdicts[i - 1] for r in rs]
            out.append(CompareSummary(label, fam, backend, geomean(ratios) if ratios else None, vs.count(FASTER),
                                      vs.count(SLOWER), vs.count(SAME), vs.count(None)))
    return out


def regressions(rows: list[CompareRow], pct: float) -> list[tuple[CompareRow, int, float]]:
    """(row, run index, speedup) of every case that is SLOWER (outside the noise) than in the first run by more
    than pct percent of throughput: speedup < 1 - pct/100."""
    out = []
    for row in rows:
        for i, v in enumerate(row.verdicts, 1):
            r = ratio(row, i)
            if v == SLOWER and r is not None and r < 1.0 - pct / 100.0:
                out.append((row, i, r))
    return out


def changed(row: CompareRow) -> bool:
    """Worth a line: a verdict other than SAME, or a case missing / wrong in one of the runs."""
    return any(v != SAME for v in row.verdicts)


COMPARE_SUMMARY_COLUMNS = ("run", "family", "backend", "speedup (geomean)", "penalty", "FASTER", "SLOWER", "SAME",
                           "in one run only")


def compare_text(runs: list[tuple[str, list[Record]]], fmt: str = "terminal", *, show_all: bool = False,
                 color: bool | None = None) -> str:
    """A summary first (per run, family and backend: geomean speedup over the first run, counts of FASTER /
    SLOWER / SAME), then the rows that changed (all of them with show_all; the CSV always has all)."""
    rows = compare_runs(runs)
    labels = [lab for lab, _ in runs]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["family", "dtype", "shape", "backend"] + [f"{lab} median_s" for lab in labels]
                   + [f"{lab} speedup" for lab in labels[1:]] + [f"{lab} verdict" for lab in labels[1:]])
        for row in rows:
            w.writerow([row.family, row.dtype, row.shape, row.backend]
                       + ["" if c is None else c.median_s for c in row.cells]
                       + ["" if ratio(row, i) is None else ratio(row, i) for i in range(1, len(labels))]
                       + ["" if v is None else v for v in row.verdicts])
        return buf.getvalue()
    color = isatty() if color is None and fmt == "terminal" else bool(color)
    summ = compare_summary(runs, rows)
    s_body = []
    for g in summ:
        style = "green" if g.faster > g.slower else "red" if g.slower > g.faster else ""
        s_body.append([g.label, g.family, g.backend, (fmt_speedup(g.geomean), style), fmt_penalty(g.geomean),
                       (str(g.faster), "green" if g.faster else ""), (str(g.slower), "red" if g.slower else ""),
                       str(g.same), str(g.only_one)])
    shown = [r for r in rows if show_all or changed(r)]
    head = ["family", "dtype", "shape", "backend"] + labels
    body = []
    for row in shown:
        cells = [row.family, row.dtype, row.shape, row.backend]
        for i, c in enumerate(row.cells):
            if c is None:
                cells.append("-")
                continue
            txt = throughput_text(c) if c.ok is not False else "WRONG"
            v = row.verdicts[i - 1] if i else None
            if v is not None:
                txt += f" {v} {fmt_speedup(ratio(row, i))}"
            cells.append((txt, {FASTER: "green", SLOWER: "red"}.get(v, "")))
        body.append(cells)
    hidden = len(rows) - len(shown)
    note = (f"Against the first run ({labels[0]}): speedup = throughput(run) / throughput(first) (×), penalty = "
            "1 − speedup; FASTER / SLOWER when the p20–p80 ranges of the two medians are disjoint, SAME when they "
            "overlap; the geometric mean is over the cases both runs have."
            + (f" {hidden} unchanged row(s) (SAME everywhere) not listed: --all lists them." if hidden else ""))
    align_rows = "llll" + "r" * len(labels)
    if fmt == "md":
        parts = [markdown(COMPARE_SUMMARY_COLUMNS, s_body, "lllrrrrrr"), markdown(head, body, align_rows), note]
        return "\n".join(parts) + "\n"
    parts = [table(COMPARE_SUMMARY_COLUMNS, s_body, "lllrrrrrr", title="summary", color=color)]
    parts.append(table(head, body, align_rows, title="changed rows" if not show_all else "all rows", color=color)
                 if body else "no row changed (every shared case is SAME)\n")
    return "\n".join(parts) + "\n" + note + "\n"


# ---------------------------------------------------------------------------------------------------
# plots


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"plotting needs matplotlib (pip install 'pykernels[plot]'): {e}") from None
    return plt


_MARKERS = {"gemm": "o", "attention": "s", "decode": "^"}


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s).strip("-").lower()[:60]


def plot_roofline(records: list[Record], out_dir: Path) -> list[Path]:
    """One PNG per device: FLOP/s against arithmetic intensity (log-log), a point per (case, backend), with
    the measured peaks as roofline lines (one compute ceiling per dtype)."""
    plt = _plt()
    paths = []
    by_machine: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.ok is not False:
            by_machine[r.machine].append(r)
    for machine, recs in sorted(by_machine.items()):
        fig, ax = plt.subplots(figsize=(11.5, 6))
        backends = sorted({r.backend for r in recs})
        colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
        ais = [r.intensity for r in recs]
        lo, hi = min(ais) / 2, max(ais) * 2
        bw = max((r.peak_bw for r in recs if r.peak_bw), default=None)
        pf_by_dtype: dict[str, float] = {}
        for r in recs:
            if r.peak_flops:
                pf_by_dtype[r.dtype] = max(pf_by_dtype.get(r.dtype, 0.0), r.peak_flops)
        vc_by_dtype: dict[str, float] = {}
        for r in recs:
            if r.vendor_ceiling:
                vc_by_dtype[r.dtype] = max(vc_by_dtype.get(r.dtype, 0.0), r.vendor_ceiling)
        # Hardware roofs solid (one grey per dtype), vendor ceilings dashed in the same grey.
        greys = ["0.15", "0.45", "0.65"]
        for i, (dt, pf) in enumerate(sorted(pf_by_dtype.items())):
            if bw:
                ridge = pf / bw
                xs = [lo, min(max(ridge, lo), hi), hi]
                ax.plot(xs, [min(pf, x * bw) for x in xs], color=greys[i % 3], ls="-", lw=1.3,
                        label=f"hardware roof {dt}: {fmt_rate(pf, 'FLOP/s')}, {fmt_rate(bw, 'B/s')} (probes)")
            else:
                ax.axhline(pf, color=greys[i % 3], ls="-", lw=1.3, label=f"hardware peak {dt} {fmt_rate(pf, 'FLOP/s')}")
            vc = vc_by_dtype.get(dt)
            if vc:
                ax.axhline(vc, color=greys[i % 3], ls="--", lw=1.0,
                           label=f"vendor ceiling {dt}: {fmt_rate(vc, 'FLOP/s')} (best vendor GEMM)")
        for b in backends:
            for fam in ("gemm", "attention", "decode"):
                pts = [r for r in recs if r.backend == b and r.family == fam]
                if not pts:
                    continue
                filled = [r for r in pts if r.dtype == "float32"]
                hollow = [r for r in pts if r.dtype != "float32"]
                if filled:
                    ax.scatter([r.intensity for r in filled], [r.flops_per_s for r in filled], marker=_MARKERS[fam],
                               color=colors[b], s=40, alpha=0.85)
                if hollow:
                    ax.scatter([r.intensity for r in hollow], [r.flops_per_s for r in hollow], marker=_MARKERS[fam],
                               facecolors="none", edgecolors=[colors[b]], s=40, linewidths=1.4)
        for b in backends:
            ax.scatter([], [], color=colors[b], marker="o", label=b)
        for fam, m in _MARKERS.items():
            ax.scatter([], [], color="0.5", marker=m, label=fam)
        ax.scatter([], [], facecolors="none", edgecolors="0.5", marker="o", label="hollow: bf16/fp16; filled: fp32")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte of compulsory traffic)")
        ax.set_ylabel("FLOP/s")
        ax.set_title(f"Roofline: {machine}")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        p = out_dir / f"roofline-{_slug(machine)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_speedups(records: list[Record], out_dir: Path, against: str = "native") -> list[Path]:
    """One PNG per (device, family): horizontal bars of each non-reference backend's speedup over `native` (or
    over the best vendor with against='vendor') per dtype and shape, on a log axis centred on 1× (a 35× and a
    0.03× bar are both readable); hatched bars are within noise; the legend gives each backend's geometric
    mean over the shapes."""
    plt = _plt()
    rows = penalty_rows(records)
    geo = {(g.machine, g.family, g.backend): g for g in geomean_rows(rows)}
    paths = []
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        if row.ok:
            groups[(row.rec.machine, row.rec.family)].append(row)
    for (machine, fam), rs in sorted(groups.items()):
        pick = (lambda row: row.vs_native) if against == "native" else (lambda row: row.vs_vendor)
        rs = [row for row in rs if pick(row) is not None]
        if not rs:
            continue
        cases = []
        for row in rs:
            c = f"{row.rec.dtype} {row.rec.shape}"
            if c not in cases:
                cases.append(c)
        backends = sorted({row.rec.backend for row in rs})
        colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(sorted({r.backend for r in records}))}
        h = 0.8 / len(backends)
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.42 * len(cases) * max(1, len(backends)) ** 0.6))
        vals = [pick(r).speedup for r in rs]
        lo, hi = min(min(vals), 1.0), max(max(vals), 1.0)
        for j, b in enumerate(backends):
            for row in rs:
                if row.rec.backend != b:
                    continue
                sp = pick(row)
                y = cases.index(f"{row.rec.dtype} {row.rec.shape}") + (j - (len(backends) - 1) / 2) * h
                v = sp.speedup
                # a bar from 1x to the speedup: right of 1 = faster than the reference, left = slower
                ax.barh(y, v - 1.0, left=1.0, height=h * 0.95, color=colors[b], alpha=0.45 if sp.noise else 0.9,
                        hatch="//" if sp.noise else None, edgecolor="0.3", linewidth=0.4)
                ax.text(v, y, f" {fmt_speedup(v, sp.noise)}" if v >= 1 else f"{fmt_speedup(v, sp.noise)} ",
                        va="center", ha="left" if v >= 1 else "right", fontsize=6)
        from matplotlib.patches import Patch

        def geo_text(b, machine=machine, fam=fam):
            g = geo.get((machine, fam, b))
            v = None if g is None else (g.vs_native if against == "native" else g.vs_vendor)
            return f"{b} (geomean {fmt_speedup(v)})" if v is not None else b

        handles = [Patch(facecolor=colors[b], label=geo_text(b)) for b in backends]
        handles.append(Patch(facecolor="white", hatch="//", edgecolor="0.3", label="within noise"))
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ref = "native" if against == "native" else "the best vendor backend"
        ax.set_xlabel(f"speedup over {ref} (×, log scale): throughput(X) / throughput(ref); > 1 = faster")
        ax.set_title(f"{fam}: speedup over {ref} — {machine}", fontsize=10)
        # room for the labels: a factor of the span on each side, never narrower than 0.5x..2x
        span = max(hi / lo, 4.0)
        ax.set_xlim(min(lo, 0.5) / span ** 0.18, max(hi, 2.0) * span ** 0.18)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.1 0.2 0.5 1 2 5 10 ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="x", which="major", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="best")
        fig.tight_layout()
        p = out_dir / f"speedup-vs-{against}-{fam}-{_slug(machine)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


plot_penalties = plot_speedups  # the former name


def plot_all(records: list[Record], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_roofline(records, out) + plot_speedups(records, out, "native") + plot_speedups(records, out, "vendor")


def failures_text(failures: list[dict], fmt: str = "terminal") -> str:
    """The cases that crashed or hung (no timing): listed after the tables as failed, with their reason."""
    if not failures:
        return ""
    if fmt == "csv":
        return ""
    if fmt == "md":
        lines = ["", "### Failed cases (crashed or hung: not measured)", "",
                 "| backend | family | dtype | shape | status | reason |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {f['backend']} | {f['family']} | {f['dtype']} | {f['shape']} | {f['status'].upper()} | "
                  f"{f['reason']} |" for f in failures]
    else:
        lines = ["", "failed cases (crashed or hung: not measured):"]
        lines += [f"  {f['status'].upper():8s} {f['backend']} {f['family']} {f['dtype']} {f['shape']}: {f['reason']}"
                  for f in failures]
    return "\n".join(lines) + "\n"
