"""`pykernels fleet`: device specs and discovery (no Ray needed), and two runs on a local Ray cluster whose
worker nodes declare different devices of this CPU: a smoke sweep on both with the merged report checked,
and a node killed mid-sweep whose device `--resume` completes without measuring its finished cases again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pykernels.fleet import DeviceSpecError, FleetOptions, discover, parse_spec, run_fleet
from pykernels.harness import device as devmod
from pykernels.harness.results import load, load_many, read_journal

# ---------------------------------------------------------------------------------------------------
# specs and discovery


def test_parse_spec():
    assert parse_spec("cpu") == {"device": "cpu", "threads": None, "backends": [], "tag": None}
    assert parse_spec("cpu+threads=2+tag=x+backend=a+backend=b") == {
        "device": "cpu", "threads": 2, "backends": ["a", "b"], "tag": "x"}
    assert parse_spec("cuda:1")["device"] == "cuda:1"


@pytest.mark.parametrize("bad, word", [("", "empty"), ("cpu,threads=2", "commas"), ("cpu+threads=0", "threads"),
                                       ("cpu+threads=x", "threads"), ("cpu+speed=9", "option"), ("9cpu", "torch device"),
                                       ("cpu+tag=", "option")])
def test_parse_spec_rejects(bad, word):
    with pytest.raises(DeviceSpecError, match=word):
        parse_spec(bad)


def _node(nid, host, res, alive=True):
    return {"NodeID": nid, "Alive": alive, "NodeManagerHostname": host, "NodeManagerAddress": "10.0.0.1",
            "Resources": res}


def test_discover():
    nodes = [
        _node("h", "head", {"CPU": 0.0, "memory": 1.0}),                         # --num-cpus 0: no device
        _node("g", "gpu1", {"CPU": 8.0, "GPU": 2.0}),                            # its CPU and two GPUs
        _node("d", "box", {"CPU": 2.0, "pk_device:cpu+threads=1": 1.0, "pk_device:npu+backend=p": 1.0}),
        _node("e", "box", {"CPU": 2.0, "pk_device:cpu+threads=1": 1.0}),        # same host, same spec: kept apart
        _node("x", "dead", {"CPU": 4.0}, alive=False),
    ]
    devs = {d.key: d for d in discover(nodes)}
    assert set(devs) == {"cpu+threads=1@box", "cpu+threads=1@box-2", "npu+backend=p@box", "cpu@gpu1",
                         "cuda0@gpu1", "cuda1@gpu1"}
    assert devs["cpu+threads=1@box"].threads == 1 and devs["cpu+threads=1@box"].resource == "pk_device:cpu+threads=1"
    assert devs["npu+backend=p@box"].backends == ["p"] and devs["npu+backend=p@box"].device == "npu"
    assert devs["cuda1@gpu1"].device == "cuda:1" and devs["cuda1@gpu1"].gpus == 2
    assert devs["cpu@gpu1"].threads is None and devs["cpu@gpu1"].gpus == 0
    with pytest.raises(DeviceSpecError):
        discover([_node("b", "bad", {"pk_device:cpu+threads=-1": 1.0})])


def test_device_tag_is_part_of_the_identity(monkeypatch):
    fp = {"type": "cpu", "name": "X", "threads": 2, "host": "h"}
    plain = devmod.machine_id(fp)
    assert devmod.machine_id({**fp, "tag": "npu0"}) != plain
    assert devmod.device_label({**fp, "tag": "npu0"}).endswith("[npu0]")
    assert devmod.machine_id({**fp, "threads": 1}) != plain  # thread count already keeps devices apart


def test_cli_without_ray_or_with_bad_options(monkeypatch, capsys):
    from pykernels import cli
    from pykernels.fleet import driver

    monkeypatch.setattr(driver, "ray_problem", lambda: "ray is not installed (test)")
    monkeypatch.setattr("pykernels.fleet.ray_problem", lambda: "ray is not installed (test)")
    assert cli.main(["fleet", "--shape", "M=3,N=3,K=3"]) == 2
    assert "unavailable: ray is not installed" in capsys.readouterr().err
    monkeypatch.setattr("pykernels.fleet.ray_problem", lambda: None)
    assert cli.main(["fleet", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.slow
def test_node_crash_and_timeout_are_failed_cases_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """The node side alone (a plain generator, no Ray): a case that kills the sweep process and a case that hangs
    are reported failed with their reason; the sweep restarts with --resume without them and finishes."""
    from pykernels.fleet import node

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = ["--shape", "M=65,N=63,K=33", "--shape", "M=33,N=64,K=127", "--shape", "M=127,N=65,K=63", "--kernel", "gemm",
            "--dtype", "float32", "--backend", "fleet_faulty", "--time-budget", "0.05", "--", "-p", "fleet_faults"]
    evs = list(node.run_device({"device": "cpu", "threads": 1, "tag": None}, args, [], case_timeout=15,
                               workdir=str(tmp_path / "w")))
    failed = {e["key"]: e["reason"] for e in evs if e["event"] == "case_failed"}
    assert failed == {"gemm/fleet_faulty-float32-M33-N64-K127": "the sweep crashed (signal SIGSEGV)",
                      "gemm/fleet_faulty-float32-M127-N65-K63": "timed out after 15 s"}, evs[-1].get("log_tail")
    assert [e["entry"]["key"] for e in evs if e["event"] == "case"] == ["gemm/fleet_faulty-float32-M65-N63-K33"]
    res = evs[-1]
    assert res["event"] == "result" and res["rc"] == 0, res.get("log_tail")
    doc = json.loads(res["json"])
    assert [b["extra_info"]["shape"] for b in doc["benchmarks"]] == ["M65-N63-K33"]
    assert doc["benchmarks"][0]["extra_info"]["resumed"] is True  # replayed after the restarts, not re-measured


# ---------------------------------------------------------------------------------------------------
# a local Ray cluster: a head without CPUs (no device) and worker nodes that declare devices of this CPU

ray = pytest.importorskip("ray", reason="ray not installed: pip install -e '.[fleet]'")

GEMM = ["--kernel", "gemm", "--dtype", "float32", "--backend", "native", "--backend", "torch"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # as pykernels fleet does: no usage report sent out

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _opts(tmp_path, args, **kw):
    lines = []
    o = FleetOptions(bench_args=args, out=tmp_path / "run", echo=lines.append, **kw)
    return o, lines


@pytest.mark.slow
def test_fleet_two_devices_merged_report(cluster, tmp_path):
    nodes = [cluster.add_node(num_cpus=1, resources={"pk_device:cpu+threads=1": 1}),
             cluster.add_node(num_cpus=1, resources={"pk_device:cpu+threads=2+tag=two": 1})]
    cluster.wait_for_nodes()
    try:
        o, lines = _opts(tmp_path, ["--shape", "M=65,N=63,K=33", *GEMM, "--time-budget", "0.05"],
                         only=["cpu+threads=1@", "cpu+threads=2+tag=two@"])
        res = run_fleet(o)
    finally:
        for n in nodes:
            cluster.remove_node(n)
    out = tmp_path / "run"
    assert res["rc"] == 0, "\n".join(lines)
    state = json.loads((out / "fleet.json").read_text())["devices"]
    assert sorted(s["status"] for s in state.values()) == ["done", "done"]
    keys = sorted(state)
    assert keys[0].startswith("cpu+threads=1@") and keys[1].startswith("cpu+threads=2+tag=two@")
    # each device's pytest-benchmark JSON: both backends, measured with its own thread count
    for k, threads in zip(keys, (1, 2)):
        doc = json.loads((out / k / "results.json").read_text())
        assert doc["machine_info"]["pykernels"]["device"]["threads"] == threads
        assert sorted(b["extra_info"]["backend"] for b in doc["benchmarks"]) == ["native", "torch"]
        assert {e["key"] for e in read_journal(out / k / "journal.jsonl")} == \
            {"gemm/native-float32-M65-N63-K33", "gemm/torch-float32-M65-N63-K33"}
    # the merged report: two devices, kept apart by machine id, each with its native and vendor rows
    recs = load_many([out / k / "results.json" for k in keys])
    assert len({r.machine_id for r in recs}) == 2
    machines = sorted({r.machine for r in recs})
    assert any("(1 thread)" in m for m in machines) and any("(2 threads) [two]" in m for m in machines)
    md = (out / "report.md").read_text()
    for m in machines:
        assert m in md
    assert md.count("M65-N63-K33") >= 2
    assert (out / "report.csv").read_text().count("native") >= 2
    assert any("case 1/2" in ln for ln in lines) and any("done in" in ln for ln in lines)


@pytest.mark.slow
def test_fleet_node_killed_then_resume(cluster, tmp_path):
    res_name = "pk_device:cpu+threads=1+tag=victim"
    victim = cluster.add_node(num_cpus=1, resources={res_name: 1})
    cluster.wait_for_nodes()
    shapes = ["--shape", "M=65,N=63,K=33", "--shape", "M=33,N=64,K=127", "--shape", "M=127,N=65,K=63"]
    args = [*shapes, *GEMM, "--time-budget", "0.4"]
    killed = []

    def kill_after_first_case(key, ev):
        if ev.get("event") == "case" and not killed:
            killed.append(ev["entry"]["key"])
            cluster.remove_node(victim)

    o, lines = _opts(tmp_path, args, only=["victim"], on_event=kill_after_first_case)
    res = run_fleet(o)
    out = tmp_path / "run"
    assert killed, "\n".join(lines)
    assert res["rc"] == 1
    (key, st), = res["devices"].items()
    assert st["status"] == "failed" and st["reason"], st
    first = {e["key"]: e for e in read_journal(out / key / "journal.jsonl") if e.get("status") == "measured"}
    assert killed[0] in first
    assert 1 <= len(first) < 6, f"the kill came too late to test --resume: {sorted(first)}"
    assert not (out / key / "results.json").exists()
    assert any("FAILED" in ln for ln in lines)
    assert (out / "report.md").exists()  # the finished cases are reported (from the journal)

    # the device comes back (a new node declaring it); --resume measures only what is missing
    back = cluster.add_node(num_cpus=1, resources={res_name: 1})
    cluster.wait_for_nodes()
    new = []
    try:
        o2, lines2 = _opts(tmp_path, [], only=["victim"], resume=True,
                           on_event=lambda k, ev: new.append(ev["entry"]["key"]) if ev.get("event") == "case" else None)
        res2 = run_fleet(o2)
    finally:
        cluster.remove_node(back)
    assert res2["rc"] == 0, "\n".join(lines2)
    assert new and not set(new) & set(first), (new, sorted(first))
    recs = load(out / key / "results.json")
    assert len(recs) == 6
    doc = json.loads((out / key / "results.json").read_text())
    resumed = {f"gemm/{b['extra_info']['backend']}-float32-{b['extra_info']['shape']}"
               for b in doc["benchmarks"] if b["extra_info"].get("resumed")}
    assert resumed == set(first)
    assert any("resuming: " in ln for ln in lines2)
