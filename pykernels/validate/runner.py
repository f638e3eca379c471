"""Drives conformance workers: one subprocess per backend, restarted after a crash or a hang."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time

from .worker import FAIL


class Worker:
    def __init__(self, backend: str, device: str, plugins=(), case_timeout: float = 300.0):
        self.backend, self.device, self.plugins = backend, device, list(plugins)
        self.case_timeout = case_timeout
        self.proc = None
        self.restarts = 0
        self.start_error: str | None = None
        self._results = None
        self._stderr = None

    def _close_files(self) -> None:
        for f in (self._results, self._stderr):
            if f is not None:
                f.close()
        self._results = self._stderr = None

    def _start(self) -> None:
        self._close_files()
        r, w = os.pipe()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker; closed in _close_files
        cmd = [sys.executable, "-m", "pykernels.validate.worker", "--backend", self.backend, "--device",
               self.device, "--result-fd", str(w)]
        for p in self.plugins:
            cmd += ["--plugin", p]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._stderr, stderr=self._stderr,
                                     pass_fds=(w,), text=True)
        os.close(w)
        self._results = os.fdopen(r, "r")
        hello = self._readline(timeout=600.0)  # the first import of torch/triton can be slow
        if not hello:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.start_error = f"worker did not start: {self._death()}"
            self.close()
            return
        msg = json.loads(hello)
        if not msg.get("ready"):
            self.start_error = msg.get("error", "worker failed to start")
            self.close()

    def _readline(self, timeout: float) -> str | None:
        sel = selectors.DefaultSelector()
        sel.register(self._results, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                return self._results.readline()  # "" at EOF: the worker died
        finally:
            sel.close()

    def _death(self) -> str:
        rc = self.proc.poll() if self.proc else None
        if rc is None:
            return "no answer"
        if rc < 0:
            try:
                return f"process killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"process killed by signal {-rc}"
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        return f"process exited with code {rc}" + (f": {' | '.join(tail)}" if tail else "")

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc = None
            self.start_error = None
            self._start()
            if self.start_error:
                return {"id": case["id"], "status": FAIL, "check": "crash" if "did not start" in self.start_error
                        else "start", "detail": self.start_error}
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(self.case_timeout)
        if line is None:  # timed out: a hang; kill the worker, the case fails
            self.proc.kill()
            self.proc.wait()
            return {"id": case["id"], "status": FAIL, "crashed": True, "check": "hang",
                    "detail": f"no answer within {self.case_timeout:.0f} s (hang); worker killed"}
        if not line:  # EOF: the worker died on this case
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            return {"id": case["id"], "status": FAIL, "crashed": True, "check": "crash",
                "detail": f"crashed: {self._death()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._close_files()
