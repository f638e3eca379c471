"""pykernels.report: speedup and penalty arithmetic, geometric means, the noise rule, best-vendor choice, wrong
answers never ranked, natural sort, the three table formats (CSV columns per shape parameter), compare (summary,
changed rows, regressions) and the plots."""

from __future__ import annotations

import csv
import io
import math

import pytest

from pykernels import report, tables
from pykernels.harness.results import Record
from pykernels.report import FASTER, SAME, SLOWER


def rec(backend, tier, median, spread=0.02, *, shape="M64-N64-K64", family="gemm", dtype="float32", machine="cpu: X",
        ok=True, flops=1e9, nbytes=1e7):
    return Record(machine=machine, device="cpu", family=family, backend=backend, tier=tier, dtype=dtype, shape=shape,
                  median_s=median, p20_s=median * (1 - spread), p80_s=median * (1 + spread), flops=flops,
                  bytes=nbytes, ok=ok, max_error=1e-7 if ok else 0.5, pct_roofline=50.0, peak_flops=1e11,
                  peak_bw=1e10)


@pytest.mark.parametrize(("t_x", "t_ref", "expected"), [
    (2.0, 1.0, 0.5),     # X takes twice as long: half the throughput -> 50% penalty
    (1.0, 1.0, 0.0),
    (1.0, 2.0, -1.0),    # X twice as fast -> -100%
    (1.08, 1.0, 1 - 1 / 1.08),
])
def test_penalty_arithmetic(t_x, t_ref, expected):
    assert report.penalty(t_x, t_ref) == pytest.approx(expected)
    # the definition: 1 - throughput(X) / throughput(ref), throughput = work / time
    work = 3.7e9
    assert report.penalty(t_x, t_ref) == pytest.approx(1 - (work / t_x) / (work / t_ref))


def test_penalty_rejects_nonpositive_times():
    with pytest.raises(ValueError):
        report.penalty(0.0, 1.0)


def test_noise_rule_and_verdicts():
    a = rec("x", "native", 1.00, 0.02)      # 0.98..1.02
    b = rec("y", "vendor", 1.03, 0.02)      # 1.0094..1.0506: overlaps a
    c = rec("z", "vendor", 1.10, 0.02)      # 1.078..1.122: disjoint from a
    assert report.within_noise(a, b) and report.within_noise(b, a)
    assert not report.within_noise(a, c)
    assert report.verdict(b, a) == SAME
    assert report.verdict(c, a) == SLOWER
    assert report.verdict(a, c) == FASTER
    assert report.overlaps(1, 2, 2, 3) and not report.overlaps(1, 2, 2.0001, 3)


def test_penalty_rows_references():
    rows = report.penalty_rows([
        rec("native", "native", 1.0),
        rec("torch", "vendor", 0.8),
        rec("numpy", "vendor", 1.5),
        rec("torch_compile", "abstraction", 1.25),
        rec("fastwrong", "abstraction", 0.1, ok=False),
    ])
    by = {r.rec.backend: r for r in rows}
    assert [r.rec.backend for r in rows] == ["native", "numpy", "torch", "fastwrong", "torch_compile"]
    assert all(r.best_vendor == "torch" for r in rows)  # the fastest vendor-tier result
    tc = by["torch_compile"]
    assert tc.vs_native.value == pytest.approx(1 - 1.0 / 1.25) and not tc.vs_native.noise
    assert tc.vs_vendor.value == pytest.approx(1 - 0.8 / 1.25) and tc.vs_vendor.ref_backend == "torch"
    assert by["native"].vs_native is None and by["native"].vs_vendor.value == pytest.approx(1 - 0.8 / 1.0)
    assert by["torch"].vs_vendor is None and by["torch"].vs_native.value == pytest.approx(1 - 1.0 / 0.8)
    assert by["numpy"].vs_vendor.value == pytest.approx(1 - 0.8 / 1.5)
    # a fast wrong answer: listed, never a reference, never ranked
    assert by["fastwrong"].vs_native is None and by["fastwrong"].vs_vendor is None and not by["fastwrong"].ok


def test_wrong_native_is_not_the_reference():
    rows = report.penalty_rows([rec("native", "native", 0.5, ok=False), rec("torch", "vendor", 1.0)])
    assert all(r.vs_native is None for r in rows)


def test_penalty_rows_group_by_case_and_machine():
    recs = [rec("native", "native", 1.0), rec("torch", "vendor", 2.0),
            rec("native", "native", 1.0, machine="cuda: H100"), rec("torch", "vendor", 0.5, machine="cuda: H100"),
            rec("torch", "vendor", 3.0, shape="M1-N64-K64")]
    rows = report.penalty_rows(recs)
    h100 = next(r for r in rows if r.rec.machine == "cuda: H100" and r.rec.backend == "torch")
    assert h100.vs_native.value == pytest.approx(1 - 1.0 / 0.5)  # never mixes machines
    lone = next(r for r in rows if r.rec.shape == "M1-N64-K64")
    assert lone.vs_native is None  # no native result for that shape


def test_noise_shown_in_tables():
    recs = [rec("native", "native", 1.0, 0.05), rec("torch", "vendor", 1.02, 0.05), rec("numpy", "vendor", 2.0, 0.01)]
    term = report.render(recs, "terminal", color=False)
    assert "(~0.98×)" in term  # torch vs native: 1/1.02, inside the noise
    assert "0.50×" in term      # numpy vs native: disjoint
    assert "\x1b[" not in term  # no colour unless asked (a terminal)
    assert "\x1b[" in report.render(recs, "terminal", color=True)
    md = report.render(recs, "md")
    lines = md.splitlines()
    assert "| device | family | dtype | shape |" in md and "|---|" in md
    assert sum(1 for line in lines if line.startswith("| cpu: X | gemm | float32 |")) == 3
    assert md.index("Geometric mean") < md.index("| device | family | dtype")  # summary first
    assert "|---:|" in md  # numbers right-aligned in Markdown too
    rows = list(csv.DictReader(io.StringIO(report.render(recs, "csv"))))
    assert len(rows) == 3
    torch_row = next(r for r in rows if r["backend"] == "torch")
    assert float(torch_row["penalty_vs_native"]) == pytest.approx(1 - 1 / 1.02)
    assert float(torch_row["speedup_vs_native"]) == pytest.approx(1 / 1.02)
    assert torch_row["noise_vs_native"] == "True" and torch_row["best_vendor"] == "torch"
    with pytest.raises(ValueError):
        report.render(recs, "html")


def test_wrong_answer_in_table():
    term = report.render([rec("native", "native", 1.0), rec("bad", "abstraction", 0.1, ok=False)], "terminal")
    assert "WRONG (error 0.5)" in term


@pytest.mark.parametrize(("x", "unit", "text"), [(1.234e11, "FLOP/s", "123 GFLOP/s"), (9.87e14, "FLOP/s", "987 TFLOP/s"),
                                                  (3.35e12, "B/s", "3.35 TB/s"), (12.0, "B/s", "12 B/s")])
def test_fmt_rate(x, unit, text):
    assert report.fmt_rate(x, unit) == text


@pytest.mark.parametrize(("t_x", "t_ref", "s", "text"), [
    (2.0, 1.0, 0.5, "0.50×"), (1.0, 1.0, 1.0, "1.00×"), (1.0, 35.2, 35.2, "35.2×"), (1.0, 412.3, 412.3, "412×"),
    (400.0, 1.0, 0.0025, "0.0025×"), (1.08, 1.0, 1 / 1.08, "0.93×")])
def test_speedup_arithmetic_and_text(t_x, t_ref, s, text):
    assert tables.speedup(t_x, t_ref) == pytest.approx(s)
    work = 3.7e9  # speedup = throughput(X) / throughput(ref)
    assert tables.speedup(t_x, t_ref) == pytest.approx((work / t_x) / (work / t_ref))
    # the penalty is 1 - speedup (docs/design.md), the same number report.penalty gives
    assert tables.penalty_of(tables.speedup(t_x, t_ref)) == pytest.approx(report.penalty(t_x, t_ref))
    assert tables.fmt_speedup(s) == text and tables.fmt_speedup(s, noise=True) == f"(~{text})"
    with pytest.raises(ValueError):
        tables.speedup(0.0, 1.0)


def test_fmt_penalty():
    assert tables.fmt_penalty(0.92) == "+8.0%" and tables.fmt_penalty(2.0) == "-100.0%"
    assert tables.fmt_penalty(35.0) == "-3400%" and tables.fmt_penalty(None) == "—"


def test_geomean_arithmetic():
    assert tables.geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert tables.geomean([1.0, 4.0, 16.0]) == pytest.approx(4.0)
    assert tables.geomean([3.0]) == pytest.approx(3.0)
    assert math.isnan(tables.geomean([]))
    with pytest.raises(ValueError):
        tables.geomean([1.0, 0.0])


def test_geomean_rows_per_backend_and_family():
    recs = [rec("native", "native", 1.0, 0.01), rec("torch", "vendor", 2.0, 0.01),             # torch 0.5x native
            rec("native", "native", 1.0, 0.01, shape="M4-N64-K64"), rec("torch", "vendor", 0.5, 0.01,
                                                                        shape="M4-N64-K64"),   # torch 2x
            rec("native", "native", 1.0, 0.05, shape="M16-N64-K64"), rec("torch", "vendor", 1.01, 0.05,
                                                                         shape="M16-N64-K64"),  # noise
            rec("bad", "abstraction", 0.1, ok=False),                                          # never averaged
            rec("native", "native", 1.0, family="decode", shape="B1-Hq1-Hkv1-L64-D64-contig"),
            rec("torch", "vendor", 8.0, family="decode", shape="B1-Hq1-Hkv1-L64-D64-contig")]
    g = {(x.family, x.backend): x for x in report.geomean_rows(report.penalty_rows(recs))}
    t = g[("gemm", "torch")]
    assert t.cases == 3 and t.vs_native == pytest.approx((0.5 * 2.0 / 1.01) ** (1 / 3))
    assert t.native_counts == (1, 1, 1)  # faster, slower, within noise
    assert t.vs_vendor == pytest.approx(1.0) and t.vendor_counts == (0, 0, 3)  # the best vendor: its own reference
    n = g[("gemm", "native")]
    assert n.vs_native is None and n.vs_vendor == pytest.approx((2.0 * 0.5 * 1.01) ** (1 / 3))
    assert g[("gemm", "bad")].cases == 0 and g[("gemm", "bad")].wrong == 1 and g[("gemm", "bad")].vs_native is None
    assert g[("decode", "torch")].vs_native == pytest.approx(1 / 8)  # families never mix
    term = report.table_terminal(report.penalty_rows(recs), color=False)
    assert "geometric mean over shapes" in term and "0.12×" in term and "+87.5%" in term


def test_natural_sort_of_shapes():
    shapes = ["M2048-N2048-K2048", "M16-N4096-K4096", "M1-N4096-K4096", "M4-N4096-K4096", "M1024-N1024-K1024"]
    assert sorted(shapes, key=tables.natural_key) == ["M1-N4096-K4096", "M4-N4096-K4096", "M16-N4096-K4096",
                                                      "M1024-N1024-K1024", "M2048-N2048-K2048"]
    recs = [rec("native", "native", 1.0, shape=s) for s in shapes]
    assert [r.rec.shape for r in report.penalty_rows(recs)] == sorted(shapes, key=tables.natural_key)
    term = report.render(recs, "terminal", color=False)
    assert [term.index(s) for s in sorted(shapes, key=tables.natural_key)] == sorted(term.index(s) for s in shapes)


def test_terminal_numbers_right_aligned():
    recs = [rec("native", "native", 1.0), rec("torch", "vendor", 123.0), rec("numpy", "vendor", 0.5)]
    lines = [x for x in report.render(recs, "terminal", color=False).splitlines() if " M64-N64-K64 " in x]
    assert len(lines) == 3
    ends = {len(x) for x in lines}
    assert len(ends) == 1  # the last (numeric) column ends at the same place on every line


def test_csv_has_a_column_per_shape_parameter():
    recs = [rec("native", "native", 1.0, shape="M64-N65-K63"),
            rec("native", "native", 1.0, family="attention", shape="B2-Hq8-Hkv2-S65-D64-causal"),
            rec("native", "native", 1.0, family="decode", shape="B8-Hq32-Hkv8-L4096-D128-paged16")]
    rows = list(csv.DictReader(io.StringIO(report.render(recs, "csv"))))
    head = list(rows[0])
    assert head[:4] == ["device", "family", "dtype", "shape"]
    # the parameters present, in the fixed order (no ragged label here: no ragged column), then the rest
    assert head[4:17] == ["M", "N", "K", "B", "Hq", "Hkv", "S", "L", "D", "causal", "paged", "block_size", "backend"]
    by = {r["family"]: r for r in rows}
    assert (by["gemm"]["M"], by["gemm"]["N"], by["gemm"]["K"], by["gemm"]["D"]) == ("64", "65", "63", "")
    assert (by["attention"]["Hkv"], by["attention"]["S"], by["attention"]["causal"]) == ("2", "65", "1")
    assert (by["decode"]["L"], by["decode"]["paged"], by["decode"]["block_size"]) == ("4096", "1", "16")
    # params recorded by the harness win over the label (decode's context is the L column)
    r = Record(**{**rec("native", "native", 1.0, family="decode", shape="x").__dict__,
                  "params": {"B": 1, "Hq": 2, "Hkv": 1, "context": 7, "D": 64, "paged": False}})
    assert report.shape_params(r) == {"B": 1, "Hq": 2, "Hkv": 1, "L": 7, "D": 64, "paged": False}


def test_compare_runs_verdicts():
    run_a = [rec("native", "native", 1.0), rec("torch", "vendor", 1.0), rec("only_a", "vendor", 1.0)]
    run_b = [rec("native", "native", 0.5, machine="cuda: H100"), rec("torch", "vendor", 1.01, machine="cuda: H100"),
             rec("torch_compile", "abstraction", 1.0, machine="cuda: H100")]
    rows = report.compare_runs([("a", run_a), ("b", run_b)])
    by = {r.backend: r for r in rows}
    assert by["native"].verdicts == (FASTER,)
    assert by["torch"].verdicts == (SAME,)
    assert by["only_a"].cells[1] is None and by["only_a"].verdicts == (None,)
    assert by["torch_compile"].cells[0] is None
    text = report.compare_text([("a", run_a), ("b", run_b)], color=False)
    assert "FASTER 2.00×" in text
    # summary first, then only the rows that changed (torch is SAME: left out, and said so)
    assert text.index("summary") < text.index("changed rows")
    changed = text[text.index("changed rows"):]
    assert "native" in changed and " torch " not in changed and "1 unchanged row(s)" in text
    assert " torch " in report.compare_text([("a", run_a), ("b", run_b)], show_all=True, color=False)
    md = report.compare_text([("a", run_a), ("b", run_b)], "md")
    assert md.startswith("| run | family | backend | speedup (geomean) |")
    assert "| family | dtype | shape | backend | a | b |" in md
    rows_csv = list(csv.reader(io.StringIO(report.compare_text([("a", run_a), ("b", run_b)], "csv"))))
    assert rows_csv[0][-1] == "b verdict" and "b speedup" in rows_csv[0] and len(rows_csv) == 1 + len(rows)


def test_compare_summary_and_regressions():
    old = [rec("native", "native", 1.0, 0.01, shape=f"M{m}-N64-K64") for m in (1, 4, 16, 64)]
    new = [rec("native", "native", t, 0.01, shape=f"M{m}-N64-K64") for m, t in ((1, 0.5), (4, 1.25), (16, 1.003),
                                                                                  (64, 1.06))]
    summ = report.compare_summary([("old", old), ("new", new)])
    assert len(summ) == 1
    s = summ[0]
    assert (s.faster, s.slower, s.same, s.only_one) == (1, 2, 1, 0)
    assert s.geomean == pytest.approx((2.0 * 0.8 * (1 / 1.003) * (1 / 1.06)) ** 0.25)
    rows = report.compare_runs([("old", old), ("new", new)])
    assert [(r.shape, round(x, 3)) for r, _, x in report.regressions(rows, 10)] == [("M4-N64-K64", 0.8)]
    assert len(report.regressions(rows, 5)) == 2   # 1.06x slower is a regression beyond 5%
    assert report.regressions(rows, 30) == []
    # a SAME case never fails the build, however large its ratio (its noise covers it)
    noisy = [rec("native", "native", 1.3, 0.3, shape="M1-N64-K64")]
    assert report.regressions(report.compare_runs([("old", old[:1]), ("new", noisy)]), 1) == []


def test_compare_natural_sort():
    a = [rec("native", "native", 1.0, shape=s) for s in ("M16-N1-K1", "M2-N1-K1", "M1024-N1-K1")]
    assert [r.shape for r in report.compare_runs([("a", a), ("b", a)])] == ["M2-N1-K1", "M16-N1-K1", "M1024-N1-K1"]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [rec("native", "native", 1.0), rec("torch", "vendor", 0.5), rec("torch_compile", "abstraction", 1.0, 0.05),
            rec("native", "native", 1e-3, family="decode", shape="B1-Hq4-Hkv4-L64-D64-contig", nbytes=1e6, flops=1e5),
            rec("torch", "vendor", 3e-3, family="decode", shape="B1-Hq4-Hkv4-L64-D64-contig", nbytes=1e6, flops=1e5,
                dtype="bfloat16")]
    paths = report.plot_all(recs, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    # decode has no pair on the same dtype (fp32 native, bf16 torch): no speedup chart for it
    assert names == ["roofline-cpu--x.png", "speedup-vs-native-gemm-cpu--x.png", "speedup-vs-vendor-gemm-cpu--x.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
