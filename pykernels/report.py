"""Penalty tables (terminal, Markdown, CSV), cross-run comparison with noise verdicts, and plots.

penalty(X vs Y) = 1 - throughput(X) / throughput(Y) = 1 - t(Y) / t(X) for the same problem (docs/design.md).
Reported against `native` and against the best vendor backend (the vendor-tier backend with the lowest
median on that case). Negative: X is faster.

Noise rule: each median comes with its p20..p80 range over the timed samples. Two results whose ranges
overlap are "within noise": the penalty is printed in parentheses with a "~" and counts as no difference;
compare's verdict is SAME. Only disjoint ranges give a penalty / FASTER / SLOWER.

matplotlib is imported only by the plot functions.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .harness.results import PROBE_ERROR_PCT, Record

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

    def text(self) -> str:
        s = f"{100 * self.value:+.1f}%"
        return f"(~{s})" if self.noise else s


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
                                               if c[1] in ("gemm", "attention", "decode") else 9, c[2], c[3])):
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
# slack for clock and timer noise); it is flagged, never printed as a plain number.

COLUMNS = ("device", "family", "dtype", "shape", "backend", "tier", "median", "p20-p80", "throughput",
           "% of peak", "vs native", "vs best vendor")


def _cells(row: Row) -> list[str]:
    r = row.rec
    if not row.ok:
        err = "inf" if r.max_error is None or r.max_error == math.inf else f"{r.max_error:.2g}"
        status = f"WRONG (error {err})"
        return [r.machine, r.family, r.dtype, r.shape, r.backend, r.tier, fmt_time(r.median_s), "", status, "", "",
                ""]
    pct = "" if r.pct_roofline is None else f"{r.pct_roofline:.0f}%"
    if r.pct_roofline is not None and r.pct_roofline > PROBE_ERROR_PCT:
        pct = f"{r.pct_roofline:.0f}% PROBE ERROR"  # above the hardware peak: the peak is wrong, not the kernel
    med = fmt_time(r.median_s) + (" (!)" if r.warning else "")
    vn = row.vs_native.text() if row.vs_native else ("ref" if r.backend == "native" else "-")
    vv = row.vs_vendor.text() if row.vs_vendor else ("best" if r.backend == row.best_vendor else "-")
    if row.vs_vendor and r.tier == "vendor":
        vv += f" vs {row.best_vendor}"
    return [r.machine, r.family, r.dtype, r.shape, r.backend, r.tier, med,
            f"{fmt_time(r.p20_s)}-{fmt_time(r.p80_s)}", throughput_text(r), pct, vn, vv]


def table_terminal(rows: list[Row]) -> str:
    """Plain text: a block per (device, family, dtype, shape), one line per backend."""
    out = []
    last = None
    widths = [8, 10, 10, 26, 14, 12, 10, 22, 16, 11, 12, 22]
    for row in rows:
        c = _cells(row)
        head = tuple(c[:4])
        if head != last:
            out.append("")
            out.append(f"{c[1]} {c[2]} {c[3]}   [{c[0]}]")
            out.append("  " + "".join(x.ljust(w) for x, w in zip(COLUMNS[4:], widths[4:])).rstrip())
            last = head
        out.append("  " + "".join(x.ljust(w) for x, w in zip(c[4:], widths[4:])).rstrip())
    legend = ("penalty = 1 - thr(X)/thr(ref); negative = faster; (~x%) = within noise (p20-p80 ranges overlap); "
              "% of peak = of the roofline bound from the measured peaks")
    return "\n".join(out[1:] + ["", *peaks_lines(rows), legend]) + "\n"


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
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(x.replace("|", "/") for x in _cells(row)) + " |")
    lines += [""] + [f"- {x}" for x in peaks_lines(rows)]
    lines += ["", ("Penalty = 1 − throughput(X) / throughput(reference); negative means X is faster. "
                   "A value in parentheses with ~ is within the measured noise (the p20–p80 ranges of the two "
                   "medians overlap). % of peak is the fraction of the roofline bound min(peak FLOP/s, "
                   "intensity × peak bandwidth), with peaks measured on the device.")]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("device", "family", "dtype", "shape", "backend", "tier", "median_s", "p20_s", "p80_s", "cv",
              "rounds", "flops", "bytes", "flops_per_s", "bytes_per_s", "pct_roofline", "ok", "max_error",
              "penalty_vs_native", "noise_vs_native", "best_vendor", "penalty_vs_vendor", "noise_vs_vendor")


def table_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for row in rows:
        r = row.rec
        w.writerow([r.machine, r.family, r.dtype, r.shape, r.backend, r.tier, r.median_s, r.p20_s, r.p80_s, r.cv,
                    r.rounds, r.flops, r.bytes, r.flops_per_s, r.bytes_per_s,
                    "" if r.pct_roofline is None else r.pct_roofline, r.ok, "" if r.max_error is None else r.max_error,
                    "" if row.vs_native is None else row.vs_native.value,
                    "" if row.vs_native is None else row.vs_native.noise, row.best_vendor or "",
                    "" if row.vs_vendor is None else row.vs_vendor.value,
                    "" if row.vs_vendor is None else row.vs_vendor.noise])
    return buf.getvalue()


def render(records: list[Record], fmt: str) -> str:
    rows = penalty_rows(records)
    if fmt == "terminal":
        return table_terminal(rows)
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
    keys.sort(key=lambda k: (fam_order.get(k[0], 9), k[1], k[2], k[3]))
    rows = []
    for k in keys:
        cells = tuple(d.get(k) for d in index)
        base = cells[0]
        verdicts = tuple(None if (base is None or c is None or base.ok is False or c.ok is False) else verdict(c, base)
                         for c in cells[1:])
        rows.append(CompareRow(*k, cells=cells, verdicts=verdicts))
    return rows


def compare_text(runs: list[tuple[str, list[Record]]], fmt: str = "terminal") -> str:
    rows = compare_runs(runs)
    labels = [lab for lab, _ in runs]
    head = ["family", "dtype", "shape", "backend"] + labels
    body = []
    for row in rows:
        cells = []
        for i, c in enumerate(row.cells):
            if c is None:
                cells.append("-")
                continue
            txt = throughput_text(c) if c.ok is not False else "WRONG"
            if i > 0 and row.verdicts[i - 1] is not None:
                v = row.verdicts[i - 1]
                ratio = row.cells[0].median_s / c.median_s
                txt += f" {v} x{ratio:.2f}"
            cells.append(txt)
        body.append([row.family, row.dtype, row.shape, row.backend] + cells)
    note = (f"verdicts against the first column ({labels[0]}): FASTER / SLOWER when the p20-p80 ranges of the two "
            "medians are disjoint, SAME when they overlap; xR = throughput ratio.")
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(x.replace("|", "/") for x in b) + " |" for b in body]
        return "\n".join(lines + ["", note]) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["family", "dtype", "shape", "backend"] + [f"{lab} median_s" for lab in labels]
                   + [f"{lab} verdict" for lab in labels[1:]])
        for row in rows:
            w.writerow([row.family, row.dtype, row.shape, row.backend]
                       + ["" if c is None else c.median_s for c in row.cells]
                       + ["" if v is None else v for v in row.verdicts])
        return buf.getvalue()
    widths = [max(len(str(x)) for x in col) + 2 for col in zip(head, *body)]
    lines = ["".join(str(x).ljust(w) for x, w in zip(head, widths)).rstrip()]
    lines += ["".join(str(x).ljust(w) for x, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines + ["", note]) + "\n"


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


_PENALTY_AXIS_MIN = 300.0  # bars of penalties below -300% (X over 4x faster) are cut there; the label keeps the value
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


def plot_penalties(records: list[Record], out_dir: Path, against: str = "native") -> list[Path]:
    """One PNG per (device, family): horizontal bars of each non-reference backend's penalty against
    `native` (or the best vendor with against='vendor') per dtype and shape; hatched bars are within noise."""
    plt = _plt()
    rows = penalty_rows(records)
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
        fig, ax = plt.subplots(figsize=(10, 1.0 + 0.42 * len(cases) * max(1, len(backends)) ** 0.6))
        for j, b in enumerate(backends):
            for row in rs:
                if row.rec.backend != b:
                    continue
                pen = pick(row)
                y = cases.index(f"{row.rec.dtype} {row.rec.shape}") + (j - (len(backends) - 1) / 2) * h
                v = 100 * pen.value
                shown = max(v, -_PENALTY_AXIS_MIN)  # a much faster backend would squash every other bar
                ax.barh(y, shown, height=h * 0.95, color=colors[b], alpha=0.45 if pen.noise else 0.9,
                        hatch="//" if pen.noise else None, edgecolor="0.3", linewidth=0.4)
                lab = f"{'~' if pen.noise else ''}{v:+.0f}%"
                ax.text(shown, y, f" {lab}" if v >= 0 else f"{lab} ", va="center",
                        ha="left" if v >= 0 else "right", fontsize=6)
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=colors[b], label=b) for b in backends]
        handles.append(Patch(facecolor="white", hatch="//", edgecolor="0.3", label="within noise"))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ref = "native" if against == "native" else "the best vendor backend"
        ax.set_xlabel(f"penalty vs {ref} (%): 1 - thr(X)/thr(ref); negative = faster")
        ax.set_title(f"{fam}: penalty vs {ref} — {machine}", fontsize=10)
        lo = min(0.0, max(-_PENALTY_AXIS_MIN, min(100 * pick(r).value for r in rs)))
        hi = max(0.0, max(100 * pick(r).value for r in rs))
        span = max(hi - lo, 10.0)
        ax.set_xlim(lo - 0.22 * span, hi + 0.22 * span)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(handles=handles, fontsize=7, loc="best")
        fig.tight_layout()
        p = out_dir / f"penalty-{against}-{fam}-{_slug(machine)}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_all(records: list[Record], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_roofline(records, out) + plot_penalties(records, out, "native") + plot_penalties(records, out, "vendor")


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
