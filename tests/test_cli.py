"""The `pykernels` command: info, report, compare, plot, the subcommand registry, and one-line errors (no
traceback) on wrong, truncated or foreign result files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pykernels import cli
from pykernels.harness import results
from pykernels.kernels import AttentionProblem, GemmProblem


def _extra(problem, backend, tier, median, machine="cpu: Test CPU", dtype="float32", ok=True):
    st = {"median_s": median, "p20_s": median * 0.98, "p80_s": median * 1.02, "cv": 0.02, "rounds": 9}
    return results.make_record(problem=problem, backend_name=backend, tier=tier, device="cpu", device_name=machine,
                               machine_id="t", dtype=dtype, stats=st, max_error=1e-7 if ok else 0.3, tolerance=1e-5,
                               ok=ok, peak_flops=2e11, peak_bw=2e10)


def write_run(path, scale=1.0, machine="cpu: Test CPU"):
    g, a = GemmProblem(256, 255, 257), AttentionProblem(1, 2, 2, 65, 64, True)
    exs = [_extra(g, "native", "native", 1e-3 * scale, machine), _extra(g, "torch", "vendor", 0.8e-3, machine),
           _extra(g, "torch_compile", "abstraction", 1.2e-3, machine),
           _extra(a, "native", "native", 2e-4 * scale, machine), _extra(a, "torch", "vendor", 2e-4, machine)]
    doc = {"machine_info": {}, "benchmarks": [{"name": f"b{i}", "extra_info": ex, "stats": {}} for i, ex in
                                              enumerate(exs)]}
    path.write_text(json.dumps(doc))
    return path


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("info", "report", "compare", "plot", "validate", "tokens"):
        assert name in out
    assert set(cli.SUBCOMMANDS) >= {"info", "report", "compare", "plot", "validate", "tokens"}


def test_report_formats_and_files(tmp_path, capsys):
    run = write_run(tmp_path / "run.json")
    assert cli.main(["report", str(run), "--md", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "gemm — cpu: Test CPU" in out and "M256-N255-K257" in out and "ref" in out and "best" in out
    assert "0.83×" in out  # torch_compile over native: 1.0/1.2
    assert "|---" not in out and "\x1b[" not in out  # plain text, no colour: stdout is not a terminal here
    md = (tmp_path / "t.md").read_text()
    assert "| device | family | dtype | shape |" in md and "Geometric mean" in md
    assert (tmp_path / "t.csv").read_text().startswith("device,family,dtype,shape,M,N,K,B,Hq,Hkv,S,D,causal,backend")
    assert cli.main(["report", str(run), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 6  # header + 5 rows


def test_report_md_flag_prints_markdown(tmp_path, capsys):
    run = write_run(tmp_path / "run.json")
    assert cli.main(["report", str(run), "--md"]) == 0  # --md alone: Markdown on stdout, nothing written
    out = capsys.readouterr().out
    assert "| device | family | dtype | shape |" in out and "gemm — " not in out
    assert cli.main(["report", str(run)]) == 0
    assert "| device |" not in capsys.readouterr().out
    before = run.read_text()
    assert cli.main(["report", "--md", str(run), str(run)]) == 2  # never writes Markdown over a result file
    assert "refusing to write over a result file" in capsys.readouterr().err and run.read_text() == before


def test_report_help_has_no_double_percent(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "% of peak" in out


def test_compare_two_machines(tmp_path, capsys):
    a = write_run(tmp_path / "a.json")
    b = write_run(tmp_path / "b.json", scale=0.5, machine="cuda: Other")
    assert cli.main(["compare", str(a), str(b), "--label", "old", "--label", "new", "--all"]) == 0
    out = capsys.readouterr().out
    assert "FASTER 2.00×" in out and "SAME 1.00×" in out
    assert out.splitlines()[0].strip() == "summary" and "FASTER" in out.splitlines()[1]
    head = next(line for line in out.splitlines() if line.split()[:1] == ["family"])
    assert head.split()[-2:] == ["old", "new"]


def test_compare_fail_on_slower_exit_code(tmp_path, capsys):
    a = write_run(tmp_path / "a.json")
    slow = write_run(tmp_path / "slow.json", scale=1.5)      # native 1.5x the time: 0.67x, SLOWER
    assert cli.main(["compare", str(a), str(slow)]) == 0      # no threshold: report only
    assert cli.main(["compare", str(a), str(slow), "--fail-on-slower", "5"]) == 1
    err = capsys.readouterr().err
    assert "2 case(s) slower by more than 5%" in err and "native gemm float32 M256-N255-K257 0.67×" in err
    assert cli.main(["compare", str(a), str(slow), "--fail-on-slower", "40"]) == 0  # 33% slower: under 40%
    fast = write_run(tmp_path / "fast.json", scale=0.5)
    assert cli.main(["compare", str(a), str(fast), "--fail-on-slower", "0"]) == 0  # faster never fails
    assert cli.main(["compare", str(a), str(a), "--fail-on-slower", "0"]) == 0
    assert cli.main(["compare", str(a), str(slow), "--fail-on-slower", "100"]) == 2  # usage error
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(a)]) == 0
    assert "no row changed" in capsys.readouterr().out


def test_plot_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run.json")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 5  # roofline + speedup over native (gemm, attention) + over vendor (gemm, attention)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_info_without_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and "not measured (run with --peaks)" in out
    assert "native" in out and "triton_interpret" in out
    from pykernels.backends.native import NativeBackend

    if NativeBackend().availability() is None:  # the settings `pykernels tune` measures, and their source
        assert "native tuning  decode prefetch " in out and "GEMV rows per step" in out
    assert cli.main(["info", "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"]["type"] == "cpu" and any(b["name"] == "torch" for b in doc["backends"])


def test_info_support_table(capsys):
    from pykernels import support

    assert cli.main(["info", "--support", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    native_gemm = next(x for x in lines if x.split()[:4] == ["native", "native", "cpu", "gemm"])
    assert native_gemm.split()[4:7] == ["yes", "yes", "no"]  # fp32, bf16, no fp16: the reason follows
    assert "does not support dtype float16 for 'gemm' on cpu" in native_gemm
    numpy_att = next(x for x in lines if x.split()[:4] == ["numpy", "vendor", "cpu", "attention"])
    assert numpy_att.split()[4:7] == ["no", "no", "no"] and "does not implement 'attention'" in numpy_att
    rows = support.support_rows(("cpu", "cuda"))
    by = {(r.backend, r.device, r.family): r for r in rows}
    assert by[("triton", "cpu", "gemm")].dtypes["float32"] and "does not run on cpu" in by[("triton", "cpu", "gemm")].gaps()[0]
    assert by[("native", "cpu", "gemm")].dtypes["float32"] is None
    assert {r.backend for r in rows} >= {"native", "torch", "numpy", "torch_compile", "triton", "triton_interpret"}
    assert len(rows) == len({r.backend for r in rows}) * 2 * 3   # every backend x device x family
    assert cli.main(["info", "--support", "--md"]) == 0
    assert capsys.readouterr().out.startswith("| backend | tier | device | family | float32 | bfloat16 | float16 |")
    assert cli.main(["info", "--support", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(d["backend"] == "native" and d["device"] == "cuda" for d in doc)


def test_to_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    from pykernels.results import to_dataframe

    run = write_run(tmp_path / "run.json")
    df = to_dataframe(run)
    assert isinstance(df, pd.DataFrame) and len(df) == 5
    assert {"M", "N", "K", "B", "Hq", "S", "D", "speedup_vs_native", "penalty_vs_native"} <= set(df.columns)
    g = df[(df.family == "gemm") & (df.backend == "torch_compile")].iloc[0]
    assert (g.M, g.N, g.K) == (256, 255, 257) and g.speedup_vs_native == pytest.approx(1 / 1.2)
    assert g.penalty_vs_native == pytest.approx(1 - 1 / 1.2) and g.noise_vs_native is False
    assert pd.isna(df[df.backend == "native"].iloc[0].speedup_vs_native)
    assert len(to_dataframe([run, run])) == 5  # merged as `pykernels report` merges


def test_to_dataframe_without_pandas(tmp_path, monkeypatch):
    import builtins

    from pykernels import results as pres

    real = builtins.__import__

    def no_pandas(name, *a, **k):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pip install 'pykernels\[pandas\]'"):
        pres.to_dataframe(write_run(tmp_path / "run.json"))


def _bad_files(tmp_path):
    good = json.loads(write_run(tmp_path / "good.json").read_text())
    files = {
        "missing.json": None,
        "empty.json": "",
        "truncated.json": json.dumps(good)[:-100],
        "list.json": "[]",
        "foreign.json": json.dumps({"benchmarks": [{"name": "x", "extra_info": {"kind": "other"}}]}),
        "notjson.json": "<html>",
        "badfield.json": json.dumps({"benchmarks": [{"extra_info": {**good["benchmarks"][0]["extra_info"],
                                                                    "median_s": -1}}]}),
    }
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_text(content)
    return [tmp_path / n for n in files]


@pytest.mark.parametrize("command", ["report", "plot", "compare"])
def test_bad_files_one_line_error(tmp_path, capsys, command):
    for path in _bad_files(tmp_path):
        args = [command, str(path)] + ([str(tmp_path / "good.json")] if command == "compare" else [])
        if command == "plot":
            args += ["--out", str(tmp_path / "p")]
        assert cli.main(args) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"pykernels {command}: {path}"), err
        assert "Traceback" not in err


def test_compare_needs_two_files(tmp_path, capsys):
    assert cli.main(["compare", str(write_run(tmp_path / "a.json"))]) == 2
    assert "at least two" in capsys.readouterr().err


def test_console_entry_point_no_traceback(tmp_path):
    bad = tmp_path / "truncated.json"
    bad.write_text('{"benchmarks": [')
    r = subprocess.run([sys.executable, "-m", "pykernels.cli", "report", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not valid JSON (truncated?)" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
