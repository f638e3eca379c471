"""pykernels.results: record arithmetic, the journal (append, torn lines, resume), and loading result files
(good, bad, truncated, foreign)."""

from __future__ import annotations

import json
import re

import pytest

from pykernels.harness import results
from pykernels.harness.results import Journal, ResultFileError
from pykernels.kernels import DecodeProblem, GemmProblem


def stats(median=1e-3, p20=0.9e-3, p80=1.1e-3, **kw):
    return {"median_s": median, "p20_s": p20, "p80_s": p80, "mean_s": median, "min_s": p20, "max_s": p80,
            "stddev_s": 0.0, "cv": 0.05, "rse_median": 0.01, "rounds": 10, "calls_per_round": 1, "timer": "t",
            "stopped_by": "rse", "flush": False, "launch_overhead_s": None, **kw}


_DEFAULT_PROBLEM = GemmProblem(64, 65, 63)


def record(problem=_DEFAULT_PROBLEM, backend="native", tier="native", dtype="float32", machine="cpu: X",
           ok=True, err=1e-7, **kw):
    return results.make_record(problem=problem, backend_name=backend, tier=tier, device="cpu", device_name=machine,
                               machine_id="abc", dtype=dtype, stats=stats(**kw), max_error=err, tolerance=1e-5,
                               ok=ok, peak_flops=1e11, peak_bw=1e10, sweep="test")


def doc_of(extras: list[dict]) -> dict:
    """A pytest-benchmark-shaped document around extra_info dicts."""
    return {"machine_info": {"node": "x"}, "commit_info": {}, "datetime": "2026-01-01T00:00:00", "version": "5.2.3",
            "benchmarks": [{"group": "g", "name": f"bench[{i}]", "fullname": "f", "params": {}, "extra_info": ex,
                            "stats": {"median": ex.get("median_s", 1.0)}, "options": {}} for i, ex in enumerate(extras)]}


def test_throughput_and_roofline():
    t = results.throughput(2e9, 1e8, 0.01)
    assert t["flops_per_s"] == pytest.approx(2e11) and t["gbps"] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        results.throughput(1, 1, 0)
    # intensity 20 FLOP/B, peaks 1e11 FLOP/s and 1e10 B/s: ridge at 10 -> compute bound, bound 1e11
    r = results.roofline_fraction(2e9, 1e8, 0.04, 1e11, 1e10)
    assert r["bound"] == "compute" and r["pct_roofline"] == pytest.approx(50.0)
    assert r["pct_peak_flops"] == pytest.approx(50.0) and r["pct_peak_bw"] == pytest.approx(25.0)
    # intensity 1 FLOP/B -> memory bound, bound 1e10 FLOP/s
    r = results.roofline_fraction(1e8, 1e8, 0.02, 1e11, 1e10)
    assert r["bound"] == "memory" and r["pct_roofline"] == pytest.approx(50.0)
    assert results.roofline_fraction(1, 1, 1.0, None, None)["pct_roofline"] is None


def test_warm_inputs_in_cache_are_not_judged_by_the_dram_bound():
    # M4 x 256 x 256 fp32: 0.52 MFLOP over 270 KB (~1.9 FLOP/B). Timed warm on a CPU whose L2 holds it at
    # 100 GFLOP/s, it is ~520% of the DRAM bound (1.9 FLOP/B x 1e10 B/s) but 50% of the 2e11 compute peak.
    from pykernels import report

    p = GemmProblem(4, 256, 256)
    nbytes = p.bytes(__import__("torch").float32)
    t = p.flops() / 1e11
    spr = {"l1d": 48 << 10, "l2": 2 << 20, "l3": 480 << 20}

    def rec(caches, **kw):
        ex = results.make_record(problem=p, backend_name="native", tier="native", device=kw.pop("device", "cpu"),
                                 device_name="cpu: X", machine_id="abc", dtype="float32",
                                 stats=stats(median=t, p20=t, p80=t, **kw), max_error=0.0, tolerance=1e-5,
                                 ok=True, peak_flops=2e11, peak_bw=1e10, sweep="test", caches=caches)
        return ex, report.pct_text(results.record_from(ex, None, "test"))

    warm, text = rec(spr)
    assert warm["cache"] == "l2" and warm["bound"] == "compute (in cache)"
    assert warm["pct_roofline"] == pytest.approx(50.0) and not warm["probe_error"] and text == "50%"
    assert warm["pct_peak_bw"] > 100  # informational: the caches beat the DRAM probe
    assert results.warm_cache_level("cpu", nbytes, stats(), {"l2": nbytes, "l3": 4 * nbytes}) == "l2"
    # past one core's L2 but within the last-level cache: the DRAM roofline, its excess labelled as the cache's
    llc, text = rec({"l2": nbytes - 1, "l3": nbytes})
    assert llc["cache"] == "llc" and llc["bound"] == "memory" and llc["pct_roofline"] > 103
    assert not llc["probe_error"] and text.endswith("% (in cache)")
    # from memory (flushed, larger than every cache, caches unknown, a GPU): above the DRAM bound is a probe error
    for kw in ({"caches": spr, "flush": True}, {"caches": {"l2": nbytes - 1, "l3": nbytes - 1}}, {"caches": None},
               {"caches": spr, "device": "cuda"}):
        cold, text = rec(kw.pop("caches"), **kw)
        assert cold["cache"] is None and cold["bound"] == "memory"
        assert cold["pct_roofline"] > 103 and cold["probe_error"] and text.endswith("% PROBE ERROR")
    # above the compute peak stays a probe error wherever the inputs were
    for cache in ("l2", "llc", None):
        fast = results.roofline_fraction(p.flops(), nbytes, t / 4, 2e11, 1e2, cache=cache)
        assert fast["pct_peak_flops"] == pytest.approx(200.0) and fast["probe_error"]


def test_make_record_fields():
    p = DecodeProblem(B=2, Hq=4, Hkv=2, context=65, D=64, paged=True)
    ex = record(problem=p, dtype="bfloat16")
    for k in ("family", "backend", "tier", "device", "dtype", "shape", "params", "flops", "bytes", "median_s",
              "p20_s", "p80_s", "cv", "rounds", "tflops", "gbps", "pct_roofline", "max_error", "ok"):
        assert k in ex, k
    assert ex["family"] == "decode" and ex["shape"] == p.label() and ex["params"]["paged"] is True
    assert ex["bytes"] == p.bytes(__import__("torch").bfloat16)
    json.dumps(ex)  # serialisable
    assert record(err=float("inf"), ok=False)["max_error"] == "inf"


def test_journal_append_resume_and_torn_line(tmp_path):
    path = tmp_path / "j" / "journal.jsonl"
    j = Journal(path, resume=False)
    j.append("gemm/a", {"status": "measured", "extra_info": record(), "samples": [1e-3]})
    j.append("gemm/b", {"status": "measured", "extra_info": record(backend="torch", tier="vendor")})
    j.close()
    with open(path, "a") as f:
        f.write('{"schema": "pykernels-journal/1", "key": "gemm/c", "stat')  # the case in flight when killed
    j2 = Journal(path, resume=True)
    assert j2.done() == {"gemm/a", "gemm/b"}
    assert j2.get("gemm/a")["samples"] == [1e-3]
    j2.close()
    # a new run without --resume keeps the previous journal beside it and starts empty
    j3 = Journal(path, resume=False)
    assert j3.done() == set()
    assert (tmp_path / "j" / "journal.jsonl.prev").exists()
    j3.close()


def test_read_journal_strict_errors(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('not json\n{"schema": "pykernels-journal/1", "key": "k"}\n')
    with pytest.raises(ResultFileError, match="line 1 is not JSON"):
        results.read_journal(p)
    p.write_text('{"something": "else"}\n{"x": 1}\n')
    with pytest.raises(ResultFileError, match="not a pykernels journal entry"):
        results.read_journal(p)
    assert results.read_journal(tmp_path / "missing.jsonl", strict=False) == []


def test_load_benchmark_json_and_journal(tmp_path):
    doc = doc_of([record(), record(backend="torch", tier="vendor", median=2e-3, p20=1.9e-3, p80=2.1e-3)])
    doc["benchmarks"].append({"name": "someone_elses", "extra_info": {}, "stats": {}})  # ignored
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    recs = results.load(p)
    assert [r.backend for r in recs] == ["native", "torch"]
    r = recs[1]
    assert r.machine == "cpu: X" and r.case == ("cpu: X", "gemm", "float32", "M64-N65-K63")
    assert r.flops_per_s == pytest.approx(r.flops / 2e-3)
    jp = tmp_path / "j.jsonl"
    j = Journal(jp, resume=False)
    j.append("k", {"status": "measured", "extra_info": record()})
    j.close()
    assert len(results.load(jp)) == 1


def test_load_many_later_file_wins(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc_of([record(median=1e-3)])))
    b.write_text(json.dumps(doc_of([record(median=1.05e-3, p20=1e-3, p80=1.1e-3)])))
    recs = results.load_many([a, b])
    assert len(recs) == 1 and recs[0].median_s == 1.05e-3


GOOD = record()


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("", "empty file"),
    (json.dumps(doc_of([GOOD]))[:-40], "not valid JSON (truncated?)"),
    ("{'single': 'quotes'}", "not valid JSON"),
    ("[1, 2, 3]", "not a pytest-benchmark result file (got list)"),
    ('{"results": []}', "without a 'benchmarks' list"),
    (json.dumps(doc_of([{"foo": 1}])), "no pykernels results in it"),
    (json.dumps({"benchmarks": [1]}), "benchmarks[0] is not an object"),
    (json.dumps(doc_of([{k: v for k, v in GOOD.items() if k != "median_s"}])), "missing field"),
    (json.dumps(doc_of([{**GOOD, "family": "conv"}])), "unknown family 'conv'"),
    (json.dumps(doc_of([{**GOOD, "tier": "gold"}])), "unknown tier"),
    (json.dumps(doc_of([{**GOOD, "median_s": "fast"}])), "field 'median_s' must be a finite number"),
    (json.dumps(doc_of([{**GOOD, "p20_s": 5.0}])), "p20_s <= median_s <= p80_s"),
], ids=lambda x: x[:24] if isinstance(x, str) else str(x))
def test_bad_result_files_give_one_line_errors(tmp_path, content, message):
    p = tmp_path / "bad.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ResultFileError, match=re.escape(message)) as e:
        results.load(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg


def test_directory_and_empty_journal(tmp_path):
    with pytest.raises(ResultFileError, match="is a directory"):
        results.load(tmp_path)
    p = tmp_path / "j.jsonl"
    p.write_text("")
    with pytest.raises(ResultFileError, match="no measured cases"):
        results.load(p)
