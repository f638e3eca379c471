"""pytest plugin loaded into a fleet device's `pykernels bench` run (`-p pykernels.fleet.progress_plugin`):
writes which case starts and how each ends to the JSON-lines file named by $PYKERNELS_FLEET_PROGRESS, so
that the node's task can report the case in flight, the cases left, and the case a crash or timeout took.
It only observes: the sweep, its timing, journal and results are those of any `pykernels bench`."""

from __future__ import annotations

import json
import os

_KEYS: dict[str, str] = {}
_FH = None


def _write(event: dict) -> None:
    global _FH
    path = os.environ.get("PYKERNELS_FLEET_PROGRESS")
    if not path:
        return
    if _FH is None:
        _FH = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the session
    _FH.write(json.dumps(event) + "\n")
    _FH.flush()


def case_key(item) -> str:
    """The journal key of a bench item: '<family>/<parametrize id>' (pytest_plugin._run_case's key)."""
    mark = item.get_closest_marker("pykernels_bench")
    family = mark.args[0] if mark and mark.args else "?"
    cs = getattr(item, "callspec", None)
    return f"{family}/{cs.id if cs else item.name}"


def pytest_collection_finish(session):
    _KEYS.clear()
    for it in session.items:
        if it.get_closest_marker("skip") is None:  # not the 'no cases selected' placeholder of a family
            _KEYS[it.nodeid] = case_key(it)
    _write({"event": "collected", "keys": list(_KEYS.values())})


def pytest_runtest_logstart(nodeid, location):
    if nodeid in _KEYS:
        _write({"event": "start", "key": _KEYS[nodeid], "nodeid": nodeid})


def pytest_runtest_logreport(report):
    if report.nodeid in _KEYS and (report.when == "call" or (report.when == "setup" and not report.passed)):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            reason = crash.message if crash is not None else (str(report.longrepr).strip().splitlines() or [""])[-1]
        _write({"event": "done", "key": _KEYS[report.nodeid], "nodeid": report.nodeid,
                "outcome": report.outcome, "reason": str(reason)[:500]})


def pytest_unconfigure(config):
    global _FH
    if _FH is not None:
        _FH.close()
        _FH = None
