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
    assert "gemm float32 M256-N255-K257" in out and "ref" in out and "best" in out
    assert "+16.7%" in out  # torch_compile vs native: 1 - 1.0/1.2
    assert (tmp_path / "t.md").read_text().startswith("| device |")
    assert (tmp_path / "t.csv").read_text().startswith("device,family")
    assert cli.main(["report", str(run), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 6  # header + 5 rows


def test_compare_two_machines(tmp_path, capsys):
    a = write_run(tmp_path / "a.json")
    b = write_run(tmp_path / "b.json", scale=0.5, machine="cuda: Other")
    assert cli.main(["compare", str(a), str(b), "--label", "old", "--label", "new"]) == 0
    out = capsys.readouterr().out
    assert "FASTER x2.00" in out and "SAME x1.00" in out and out.splitlines()[0].split()[-2:] == ["old", "new"]


def test_plot_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run.json")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 5  # roofline + penalty vs native (gemm, attention) + vs vendor (gemm, attention)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_info_without_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path))
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cpu: ") and "not measured (run with --peaks)" in out
    assert "native" in out and "triton_interpret" in out
    assert cli.main(["info", "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"]["type"] == "cpu" and any(b["name"] == "torch" for b in doc["backends"])


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
