"""What runs on a node: one device's sweep as the ordinary `pykernels bench` in a subprocess, its journal and
progress tailed and yielded back case by case (a Ray streaming generator), then its pytest-benchmark JSON.

No Ray import here: the driver wraps `run_device` with `ray.remote`; the function works as a plain generator
too. Faults handled on the node: a case that hangs past `case_timeout` is killed, a run that crashes (signal,
internal error) loses only the case in flight; both are reported as failed cases and the sweep restarts with
`--resume` (finished cases replayed from the journal, never measured again) and that case deselected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.2
MAX_RESTARTS = 20


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """The sweep dies with the task's worker (a dead node must not leave a sweep measuring on its own)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - not Linux: the task's finally still kills it
        pass


class _Tail:
    """New complete JSON lines of a file that another process appends to."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf = path, 0, ""

    def read(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _env(dev: dict) -> dict:
    env = dict(os.environ)
    # Ray sets OMP_NUM_THREADS=<the task's CPUs> (0 here) in its workers: the sweep gets the device's own count.
    threads = dev.get("threads")
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    if dev.get("tag"):
        env["PYKERNELS_DEVICE_TAG"] = dev["tag"]
    else:
        env.pop("PYKERNELS_DEVICE_TAG", None)
    return env


def run_device(dev: dict, bench_args: list[str], journal_entries: list[dict], case_timeout: float | None = None,
               workdir: str | None = None):
    """Yields events (dicts): {'event': 'node', ...}, 'collected', 'start', 'done' (from the progress plugin),
    'case' (a journal entry, the moment the case finished), 'case_failed' (crash/timeout), and last 'result'
    ({'json': text or None, 'rc', 'log_tail'})."""
    import platform

    work = Path(workdir or tempfile.mkdtemp(prefix="pykernels-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    journal, progress, out_json, log = (work / n for n in ("journal.jsonl", "progress.jsonl", "results.json",
                                                           "bench.log"))
    for p in (journal, progress, out_json):
        p.unlink(missing_ok=True)
    with open(journal, "w", encoding="utf-8") as f:  # what the fleet already has: replayed with --resume
        f.writelines(json.dumps(e) + "\n" for e in journal_entries)
    resume = bool(journal_entries)
    env = _env(dev)
    env["PYKERNELS_FLEET_PROGRESS"] = str(progress)
    yield {"event": "node", "host": platform.node(), "pid": os.getpid(), "threads": env["OMP_NUM_THREADS"],
           "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    jt, pt = _Tail(journal), _Tail(progress)
    jt.read()  # skip the entries written above: the fleet has them
    deselect: list[str] = []
    rc, restarts = None, 0
    cut = bench_args.index("--") if "--" in bench_args else len(bench_args)  # after --: pytest's own arguments
    bench_opts, pytest_args = bench_args[:cut], bench_args[cut + 1:]
    while True:
        cmd = [sys.executable, "-m", "pykernels.cli", "bench", *bench_opts, "--device", dev["device"],
               "--journal", str(journal), "--json", str(out_json), *(["--resume"] if resume else []),
               "--", "-p", "pykernels.fleet.progress_plugin", *pytest_args,
               *[f"--deselect={n}" for n in deselect]]
        with open(log, "ab") as lf:
            proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, cwd=str(work),
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
        inflight: dict | None = None
        timed_out = False
        try:
            while True:
                ended = proc.poll() is not None
                for e in jt.read():
                    yield {"event": "case", "entry": e}
                for e in pt.read():
                    if e["event"] == "start":
                        inflight = {**e, "t": time.monotonic()}
                    elif e["event"] == "done":
                        inflight = None
                    yield e
                if ended:
                    break
                if case_timeout and inflight and time.monotonic() - inflight["t"] > case_timeout:
                    timed_out = True
                    proc.kill()
                    proc.wait()
                    continue
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        rc = proc.returncode
        crashed = timed_out or rc < 0 or rc == 3  # 3: pytest internal error
        if not crashed or inflight is None or restarts >= MAX_RESTARTS:
            break
        reason = (f"timed out after {case_timeout:g} s" if timed_out else
                  f"the sweep crashed ({'signal ' + signal.Signals(-rc).name if rc < 0 else 'exit ' + str(rc)})")
        yield {"event": "case_failed", "key": inflight["key"], "reason": reason}
        deselect.append(inflight["nodeid"])
        resume, restarts = True, restarts + 1
    text = out_json.read_text(encoding="utf-8") if out_json.exists() else None
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:] if log.exists() else ""
    yield {"event": "result", "json": text, "rc": rc, "log_tail": tail}
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
