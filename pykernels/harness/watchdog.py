"""A per-case watchdog for sweeps that run backends in-process (the pytest plugin).

Two stages, because a hang in Python code and a hang in native code need different cures:
1. after `seconds`: SIGALRM, whose handler raises CaseHang in the main thread. A backend that hangs in
   Python code or in an interruptible system call (sleep, a wait on a lock or a socket) is interrupted; the
   case fails as hung and the sweep goes on in the same process.
2. after `seconds + grace` without the case returning (a spin in native code that never returns to the
   interpreter, or signals blocked): a thread calls `on_hard_hang()` (the plugin writes "hung" into the
   journal) and ends the process with exit code EXIT_HUNG. `--pk-resume` then skips that case as failed.

On platforms without SIGALRM (Windows) or off the main thread only stage 2 exists.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_HUNG = 86


class CaseHang(Exception):
    """The case did not answer within the watchdog's timeout."""


class Watchdog:
    def __init__(self, seconds: float | None, on_hard_hang: Callable[[], None] | None = None,
                 grace: float | None = None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.grace = grace if grace is not None else (min(max(self.seconds, 2.0), 60.0) if self.seconds else 0.0)
        self.on_hard_hang = on_hard_hang
        self._done = threading.Event()
        self._old = None
        self._thread = None

    def _alarm(self, signum, frame):
        raise CaseHang(f"no answer within {self.seconds:g} s (hang; --pk-case-timeout)")

    def _hard(self):
        if self._done.wait(self.seconds + self.grace):
            return
        try:
            if self.on_hard_hang is not None:
                self.on_hard_hang()
        finally:
            sys.stderr.write(f"\npykernels: a case did not answer within {self.seconds + self.grace:g} s and could not "
                             "be interrupted (hang in native code?); recorded as hung in the journal; ending the "
                             "process. Run again with --pk-resume to go on with the other cases.\n")
            sys.stderr.flush()
            os._exit(EXIT_HUNG)

    def __enter__(self):
        if self.seconds is None:
            return self
        if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self._thread = threading.Thread(target=self._hard, name="pykernels-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.seconds is None:
            return
        self._done.set()
        if self._old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
            self._old = None
