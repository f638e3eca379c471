"""The fleet driver: connect to Ray, find the devices, run one sweep per device as a Ray task pinned to its node
(and its declared resource or GPUs), stream each finished case into that device's journal in the run
directory, then merge every device's results into one cross-hardware report.

Run directory (one per fleet run):
    fleet.json              the command, the sweep, each device (node, spec, status, reason, counts)
    <device>/journal.jsonl  every finished case as it arrived (and failed ones with their reason)
    <device>/results.json   that device's pytest-benchmark JSON (when its sweep finished)
    <device>/bench.log      the end of its `pykernels bench` output
    report.txt|md|csv       `pykernels report` over all devices; plots/ `pykernels plot` of the same
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import devices as devmod
from . import node

FLEET_SCHEMA = "pykernels-fleet/1"


class FleetError(Exception):
    """A user-facing error of `pykernels fleet` (bad options, Ray missing or unreachable): one line."""


def ray_problem() -> str | None:
    """Why the fleet cannot run here (None when it can)."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"ray is not installed ({e}); pip install 'pykernels[fleet]'"
    return None


@dataclass
class FleetOptions:
    bench_args: list[str]
    out: Path
    address: str | None = None
    local_devices: list[str] = field(default_factory=list)
    resume: bool = False
    case_timeout: float | None = None
    device_timeout: float | None = None
    only: list[str] = field(default_factory=list)
    on_event: object = None       # callable(device_key, event) for each event (tests)
    echo: object = print
    command: str = ""


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((ln for ln in text if ln.strip()), "")
    return f"{type(e).__name__}: {first}"[:400]


def _last_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-")]
    err = [ln for ln in lines if ln.startswith(("ERROR", "pykernels", "E "))]
    return (err or lines or ["no output"])[-1][:400]


class _Run:
    def __init__(self, opts: FleetOptions, devs: list[devmod.Device], prev: dict):
        self.o, self.out = opts, opts.out
        self.state: dict[str, dict] = {}
        for k, st in (prev.get("devices") or {}).items():  # devices of the earlier run not in the cluster now
            self.state[k] = {**st, "now": "not in the cluster now"} if st.get("status") != "done" else st
        for d in devs:
            old = self.state.get(d.key, {})
            self.state[d.key] = {"device": d.as_dict(), "status": old.get("status", "pending"),
                                 "reason": old.get("reason", ""), "failed_cases": old.get("failed_cases", {}),
                                 "measured": old.get("measured", 0), "total": old.get("total")}
            self.state[d.key].pop("now", None)
        self.meta = {"schema": FLEET_SCHEMA, "command": opts.command, "bench_args": opts.bench_args,
                     "started": prev.get("started") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "resumed": prev.get("resumed", 0) + (1 if opts.resume and prev else 0)}

    def save(self):
        doc = {**self.meta, "devices": self.state}
        tmp = self.out / "fleet.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "fleet.json")

    def failed_total(self) -> int:
        return sum(len(s.get("failed_cases") or {}) + (s.get("status") == "failed") for s in self.state.values())

    def measured(self, key: str) -> int:
        """Distinct cases measured in the device's journal (over every run of this directory)."""
        from ..harness.results import read_journal

        last = {e["key"]: e for e in read_journal(self.out / key / "journal.jsonl", strict=False)}
        return sum(e.get("status") == "measured" for e in last.values())

    def journal_append(self, key: str, entry: dict):
        p = self.out / key / "journal.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _connect(opts: FleetOptions):
    import ray

    if ray.is_initialized():  # a driver that set Ray up itself (tests, notebooks): use it, leave it up
        return False
    # A cluster this command starts sends Ray's usage statistics nowhere (a benchmark run should not phone
    # home; the machines it runs on may have no route out). RAY_USAGE_STATS_ENABLED=1 turns them back on.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw = {"log_to_driver": False, "include_dashboard": False}
    if opts.address:
        if opts.local_devices:
            raise FleetError("--local-device declares devices of a local cluster; with --address declare them "
                             "on the nodes: ray start --resources '{\"pk_device:cpu+threads=8\": 1}'")
        try:
            ray.init(address=opts.address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise FleetError(f"--address {opts.address}: cannot connect to Ray ({_short(e)})") from None
    else:
        res = {}
        for s in opts.local_devices:
            try:
                devmod.parse_spec(s)
            except devmod.DeviceSpecError as e:
                raise FleetError(f"--local-device: {e}") from None
            res[devmod.PREFIX + s] = 1
        ray.init(resources=res or None, **kw)
    return True


def run_fleet(opts: FleetOptions) -> dict:
    """Run the fleet; returns {'rc', 'devices': state, 'out', 'report'}. rc 0: every device finished and no case
    failed; 1 otherwise."""
    why = ray_problem()
    if why:
        raise FleetError(f"unavailable: {why}")
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = opts.out
    prev = {}
    if (out / "fleet.json").exists():
        if not opts.resume:
            raise FleetError(f"--out {out}: holds a fleet run already; --resume completes it, or pick another --out")
        prev = json.loads((out / "fleet.json").read_text())
        if opts.bench_args and opts.bench_args != prev.get("bench_args"):
            raise FleetError(f"--resume: the run in {out} is of `{shlex.join(prev.get('bench_args') or [])}`; "
                             "give no sweep options (or the same ones) to complete it")
        opts.bench_args = prev.get("bench_args") or []
    elif opts.resume:
        raise FleetError(f"--resume: {out} holds no fleet run (no fleet.json)")
    out.mkdir(parents=True, exist_ok=True)
    echo = opts.echo or (lambda s: None)
    started_ray = _connect(opts)
    try:
        try:
            devs = devmod.discover(ray.nodes())
        except devmod.DeviceSpecError as e:
            raise FleetError(f"a node declares a bad device: {e}") from None
        if opts.only:
            devs = [d for d in devs if any(s in d.key for s in opts.only)]
        if not devs:
            raise FleetError("no devices: no alive node offers CPUs, GPUs or pk_device:<spec> resources"
                             + (f" matching --only {' '.join(opts.only)}" if opts.only else ""))
        run = _Run(opts, devs, prev)
        run.save()
        echo(f"fleet: {len(devs)} device(s) on {len({d.node_id for d in devs})} node(s); run directory {out}")
        for d in devs:
            s = run.state[d.key]
            extra = " (finished in the earlier run: kept)" if s["status"] == "done" else ""
            echo(f"  {d.key:40s} --device {d.device}"
                 + (f", {d.threads} threads" if d.threads else "") + (f", backends {','.join(d.backends)}"
                                                                     if d.backends else "") + extra)
        _schedule(ray, NodeAffinitySchedulingStrategy, run, [d for d in devs if run.state[d.key]["status"] != "done"])
        run.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run.save()
    finally:
        if started_ray:
            ray.shutdown()
    report = merge(out, echo)
    failed = run.failed_total()
    echo(f"fleet: {sum(s['status'] == 'done' for s in run.state.values())}/{len(run.state)} device(s) finished, "
         f"{failed} failure(s); {out}" + (f" (complete it: pykernels fleet --resume --out {out})" if failed else ""))
    return {"rc": 1 if failed or any(s["status"] != "done" for s in run.state.values()) else 0,
            "devices": run.state, "out": out, "report": report}


def _bench_args(base: list[str], dev: devmod.Device) -> list[str]:
    if not dev.backends:
        return list(base)
    cut = base.index("--") if "--" in base else len(base)
    base, tail = base[:cut], base[cut:]
    args, skip = [], False
    for a in base:  # a device that names its backends runs those, not the fleet's --backend list
        if skip:
            skip = False
            continue
        if a == "--backend":
            skip = True
            continue
        if a.startswith("--backend="):
            continue
        args.append(a)
    for b in dev.backends:
        args += ["--backend", b]
    return args + tail


def _schedule(ray, affinity, run: _Run, todo: list[devmod.Device]):
    """Devices on one node run one after another (a CPU sweep and anything else on the same host disturb each
    other's timing); devices on different nodes run at once."""
    opts = run.o
    echo = opts.echo or (lambda s: None)
    task = ray.remote(num_returns="streaming", max_retries=0)(node.run_device)
    queues: dict[str, list] = {}
    for d in todo:
        queues.setdefault(d.node_id, []).append(d)
    inflight: dict = {}  # generator -> [device, t0, case in flight, cases finished this run]

    def fail(g, reason: str):
        d, _, case, _ = inflight.pop(g)
        st = run.state[d.key]
        st["status"], st["reason"] = "failed", reason + (f" (case in flight: {case})" if case else "")
        if case:
            st["failed_cases"][case] = reason
            run.journal_append(d.key, {"schema": "pykernels-journal/1", "key": case, "status": "failed",
                                       "reason": reason})
        echo(f"[{d.key}] FAILED: {st['reason']}; finished cases kept in {run.out / d.key / 'journal.jsonl'}")
        run.save()

    while True:
        busy = {inflight[g][0].node_id for g in inflight}
        for nid, q in queues.items():
            if q and nid not in busy:
                d = q.pop(0)
                jp = run.out / d.key / "journal.jsonl"
                entries = []
                if jp.exists():
                    from ..harness.results import read_journal

                    entries = read_journal(jp, strict=False)
                res = {d.resource: 1} if d.resource else {}
                g = task.options(num_cpus=0, num_gpus=d.gpus, resources=res,
                                 scheduling_strategy=affinity(d.node_id, soft=False)).remote(
                    d.as_dict(), _bench_args(opts.bench_args, d), entries, opts.case_timeout)
                inflight[g] = [d, time.monotonic(), None, 0]
                run.state[d.key].update(status="running", reason="", failed_cases={})
                echo(f"[{d.key}] started" + (f" (resuming: {len(entries)} case(s) in its journal)" if entries else ""))
                busy.add(nid)
        if not inflight:
            break
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for g in ready:
            d = inflight[g][0]
            try:
                ev = ray.get(next(g))
            except StopIteration:
                if g in inflight:
                    fail(g, "the task ended without a result")
                continue
            except Exception as e:  # noqa: BLE001 - a dead node, a crashed worker, a cancelled task
                fail(g, _short(e))
                continue
            _handle(run, g, inflight, ev, echo)
            if opts.on_event:
                opts.on_event(d.key, ev)
        if opts.device_timeout:
            for g in [g for g, v in inflight.items() if time.monotonic() - v[1] > opts.device_timeout]:
                ray.cancel(g, force=True)
                fail(g, f"device timed out after {opts.device_timeout:g} s")


def _handle(run: _Run, g, inflight: dict, ev: dict, echo):
    d, t0, _, nfin = inflight[g]
    st = run.state[d.key]
    kind = ev.get("event")
    if kind == "node":
        st["node"] = {k: v for k, v in ev.items() if k != "event"}
    elif kind == "collected":
        st["total"] = len(ev["keys"])
    elif kind == "start":
        inflight[g][2] = ev["key"]
        left = max((st["total"] or 0) - nfin - 1, 0)
        echo(f"[{d.key}] case {nfin + 1}/{st['total']}: {ev['key']}  ({left} left after it, "
             f"{len(st['failed_cases'])} failed; fleet failures {run.failed_total()})")
    elif kind == "case":
        run.journal_append(d.key, ev["entry"])
        st["measured"] = run.measured(d.key)
        if inflight[g][2] == ev["entry"].get("key"):  # journaled: no longer at risk, whatever happens next
            inflight[g][2] = None
    elif kind == "done":
        inflight[g][2], inflight[g][3] = None, nfin + 1
        if ev["outcome"] == "failed":
            st["failed_cases"][ev["key"]] = ev.get("reason") or "failed"
            echo(f"[{d.key}] case FAILED: {ev['key']}: {ev.get('reason')}")
    elif kind == "case_failed":
        inflight[g][2], inflight[g][3] = None, nfin + 1
        st["failed_cases"][ev["key"]] = ev["reason"]
        run.journal_append(d.key, {"schema": "pykernels-journal/1", "key": ev["key"], "status": "failed",
                                   "reason": ev["reason"]})
        echo(f"[{d.key}] case FAILED: {ev['key']}: {ev['reason']}; the sweep goes on without it")
    elif kind == "result":
        inflight.pop(g)
        ddir = run.out / d.key
        ddir.mkdir(parents=True, exist_ok=True)
        (ddir / "bench.log").write_text(ev.get("log_tail") or "")
        if ev.get("json"):
            (ddir / "results.json").write_text(ev["json"])
        if ev.get("json") and ev.get("rc") in (0, 1):
            st["status"] = "done"
            st["reason"] = (f"{len(st['failed_cases'])} case(s) failed" if st["failed_cases"] else
                            "" if ev["rc"] == 0 else _last_line(ev.get("log_tail") or ""))
        else:
            st["status"], st["reason"] = "failed", f"pykernels bench exit {ev.get('rc')}: " + \
                _last_line(ev.get("log_tail") or "")
        echo(f"[{d.key}] {st['status']} in {time.monotonic() - t0:.0f} s: {st['measured']} case(s) in its journal"
             + (f"; {st['reason']}" if st["reason"] else ""))
    run.save()


def result_files(out: Path) -> list[Path]:
    """Each device's results.json, or its journal when the sweep did not finish (a journal is a result file)."""
    from ..harness.results import read_journal

    files = []
    for ddir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "plots"):
        if (ddir / "results.json").exists():
            files.append(ddir / "results.json")
        elif (ddir / "journal.jsonl").exists() and any(
                e.get("status") == "measured" for e in read_journal(ddir / "journal.jsonl", strict=False)):
            files.append(ddir / "journal.jsonl")
    return files


def merge(out: Path, echo=print) -> str | None:
    """The cross-hardware report of a run directory: report.txt/.md/.csv and plots/. Returns the terminal text."""
    from .. import report
    from ..harness.results import ResultFileError, load_many

    files = result_files(out)
    if not files:
        echo("fleet: nothing measured, no report")
        return None
    try:
        recs = load_many(files)
    except ResultFileError as e:
        echo(f"fleet: cannot merge: {e}")
        return None
    text = report.render(recs, "terminal")
    (out / "report.txt").write_text(text)
    (out / "report.md").write_text(report.render(recs, "md"))
    (out / "report.csv").write_text(report.render(recs, "csv"))
    try:
        report.plot_all(recs, out / "plots")
    except (RuntimeError, ImportError) as e:
        echo(f"fleet: no plots ({e})")
    echo(text)
    echo(f"fleet: merged report of {len(files)} file(s): {out / 'report.md'}")
    return text


def default_out() -> Path:
    return Path(f"fleet-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def command_line() -> str:
    return shlex.join(["pykernels", *sys.argv[1:]])
