"""pykernels.report: penalty arithmetic, the noise rule, best-vendor choice, wrong answers never ranked, the
three table formats, compare verdicts and the plots."""

from __future__ import annotations

import csv
import io

import pytest

from pykernels import report
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
    term = report.render(recs, "terminal")
    assert "(~+2.0%)" in term  # torch vs native, inside the noise
    assert "+50.0%" in term    # numpy vs native: disjoint
    md = report.render(recs, "md")
    lines = md.splitlines()
    assert lines[0].startswith("| device | family") and lines[1].startswith("|---")
    assert sum(1 for line in lines if line.startswith("| cpu: X")) == 3
    rows = list(csv.DictReader(io.StringIO(report.render(recs, "csv"))))
    assert len(rows) == 3
    torch_row = next(r for r in rows if r["backend"] == "torch")
    assert float(torch_row["penalty_vs_native"]) == pytest.approx(1 - 1 / 1.02)
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
    text = report.compare_text([("a", run_a), ("b", run_b)])
    assert "FASTER x2.00" in text and "SAME" in text
    assert report.compare_text([("a", run_a), ("b", run_b)], "md").startswith("| family | dtype | shape | backend | a | b |")
    rows_csv = list(csv.reader(io.StringIO(report.compare_text([("a", run_a), ("b", run_b)], "csv"))))
    assert rows_csv[0][-1] == "b verdict"


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [rec("native", "native", 1.0), rec("torch", "vendor", 0.5), rec("torch_compile", "abstraction", 1.0, 0.05),
            rec("native", "native", 1e-3, family="decode", shape="B1-Hq4-Hkv4-L64-D64-contig", nbytes=1e6, flops=1e5),
            rec("torch", "vendor", 3e-3, family="decode", shape="B1-Hq4-Hkv4-L64-D64-contig", nbytes=1e6, flops=1e5,
                dtype="bfloat16")]
    paths = report.plot_all(recs, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    # decode has no pair on the same dtype (fp32 native, bf16 torch): no penalty chart for it
    assert names == ["penalty-native-gemm-cpu--x.png", "penalty-vendor-gemm-cpu--x.png", "roofline-cpu--x.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
