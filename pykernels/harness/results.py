"""Result records: what one timed case stores (pytest-benchmark `extra_info`), the journal appended case by
case, and loading + validating result files for the reports.

No table formatting here (that is pykernels/report.py). A result file is either pytest-benchmark JSON
(`--benchmark-json`, `--benchmark-autosave`) or a journal (JSON lines, one case per line). Anything
else fails with ResultFileError: one line that says which file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

SCHEMA = "pykernels-result/1"
JOURNAL_SCHEMA = "pykernels-journal/1"
FAMILIES = ("gemm", "attention", "decode")
TIERS = ("native", "vendor", "abstraction")
REQUIRED = ("family", "backend", "tier", "device", "dtype", "shape", "median_s", "p20_s", "p80_s", "flops", "bytes")


class ResultFileError(ValueError):
    """A result file that cannot be used; str() is one line naming the file and the problem."""


# ---------------------------------------------------------------------------------------------------
# building a record (extra_info of one case)


def throughput(flops: float, nbytes: float, seconds: float) -> dict:
    """FLOP/s and bytes/s of one call of `seconds`."""
    if seconds <= 0:
        raise ValueError("time must be positive")
    return {"flops_per_s": flops / seconds, "bytes_per_s": nbytes / seconds,
            "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}


def roofline_fraction(flops: float, nbytes: float, seconds: float, peak_flops: float | None,
                      peak_bw: float | None, *, cache: str | None = None) -> dict:
    """% of peak: FLOP/s over the peak FLOP/s, bytes/s over the peak bandwidth, and the fraction of the
    roofline bound min(peak FLOP/s, intensity x peak bytes/s) reached (the single '% of peak' figure).

    `cache` (`warm_cache_level`): where warm timed calls found their inputs. "l2": within one core's L2, which
    the memory bandwidth probe (DRAM) does not bound and no probe measures, so the bound is the compute peak
    alone ("compute (in cache)"). "llc": within the last-level cache; the DRAM roofline stays, but a memory-bound
    figure above it is the cache's doing, not a probe error. None: from memory."""
    out = {"pct_peak_flops": None, "pct_peak_bw": None, "pct_roofline": None, "bound": None}
    if seconds <= 0:
        return out
    fps, bps = flops / seconds, nbytes / seconds
    if peak_flops:
        out["pct_peak_flops"] = 100.0 * fps / peak_flops
    if peak_bw:
        out["pct_peak_bw"] = 100.0 * bps / peak_bw
    if cache == "l2" and peak_flops:
        out["pct_roofline"] = out["pct_peak_flops"]
        out["bound"] = "compute (in cache)"
    elif peak_flops and peak_bw and nbytes > 0:
        ai = flops / nbytes
        bound = min(peak_flops, ai * peak_bw)
        out["pct_roofline"] = 100.0 * fps / bound
        out["bound"] = "compute" if peak_flops <= ai * peak_bw else "memory"
    # Above the hardware peak (3% of slack for clock and timer noise) the probe under-measured the hardware:
    # a probe error, shown as such in every report, never as a plain number. Bytes/s above the DRAM probe are
    # not one when the caches served them.
    checked = [out["pct_peak_flops"]]
    if not cache:
        checked += [out["pct_peak_bw"], out["pct_roofline"]]
    elif out["bound"] != "memory":
        checked.append(out["pct_roofline"])
    out["probe_error"] = any(v is not None and v > PROBE_ERROR_PCT for v in checked)
    return out


def warm_cache_level(device: str, nbytes: float, stats: dict, caches: dict | None) -> str | None:
    """Where warm timed calls found their inputs: a CPU case timed without flushing (`stats['flush']` false, the
    harness's CPU default) whose compulsory bytes fit one core's L2 ("l2") or the largest cache ("llc"), which a
    warm loop leaves holding them; `caches` is the fingerprint's {'l1d', 'l2', 'l3'} bytes. Otherwise None (the
    DRAM roofline; also when the caches are unknown or the inputs were rotated through copies: caches=None)."""
    if device != "cpu" or stats.get("flush") or not caches or nbytes <= 0:
        return None
    if caches.get("l2") and nbytes <= caches["l2"]:
        return "l2"
    if nbytes <= max(caches.values(), default=0):
        return "llc"
    return None


PROBE_ERROR_PCT = 103.0


def make_record(*, problem, backend_name: str, tier: str, device: str, device_name: str, machine_id: str,
                dtype: str, stats: dict, max_error: float | None, tolerance: float | None, ok: bool | None,
                peak_flops: float | None = None, peak_bw: float | None = None, sweep: str = "",
                vendor_ceiling_flops: float | None = None,
                describe: dict | None = None, checked: str = "full", caches: dict | None = None) -> dict:
    """The extra_info of one timed case (JSON-serialisable). `caches`: the cache sizes of the machine that ran
    it, for `warm_cache_level` (None: the inputs are taken to come from memory, e.g. rotated through copies)."""
    flops, nbytes = problem.flops(), problem.bytes(_torch_dtype(dtype))
    cache = warm_cache_level(device, nbytes, stats, caches)
    rec = {
        "schema": SCHEMA,
        "family": problem.family,
        "backend": backend_name,
        "tier": tier,
        "device": device,
        "device_name": device_name,
        "machine_id": machine_id,
        "dtype": dtype,
        "shape": problem.label(),
        "params": problem.params(),
        "sweep": sweep,
        "flops": flops,
        "bytes": nbytes,
        **{k: v for k, v in stats.items() if k != "samples"},
        **throughput(flops, nbytes, stats["median_s"]),
        "peak_flops": peak_flops,
        "peak_bw": peak_bw,
        "vendor_ceiling_flops": vendor_ceiling_flops,
        "cache": cache,
        **roofline_fraction(flops, nbytes, stats["median_s"], peak_flops, peak_bw, cache=cache),
        "max_error": _finite_or_none(max_error),
        "tolerance": tolerance,
        "ok": ok,
        "checked": checked,
        "backend_info": describe or {},
    }
    return rec


def _finite_or_none(x):
    if x is None:
        return None
    return float(x) if math.isfinite(x) else "inf"


def _torch_dtype(name: str):
    from ..kernels._common import dtype_of

    return dtype_of(name)


# ---------------------------------------------------------------------------------------------------
# the journal


class Journal:
    """Append-only JSON lines, one finished case per line, flushed and fsync'ed as soon as it is written:
    a sweep that dies loses at most the case in flight. `done()` gives the keys already there (--resume)."""

    def __init__(self, path: str | Path, *, resume: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict] = {}
        if resume:
            entries = read_journal(self.path, strict=False)
            self._entries = {e["key"]: e for e in entries}
            if entries and entries[-1].get("status") == "started" and _torn_tail(self.path):
                # died while writing the result of the case in flight: it finished, so it is measured again
                # rather than marked crashed
                self._entries.pop(entries[-1]["key"], None)
        elif self.path.exists() and self.path.stat().st_size:
            self.path.replace(self.path.with_name(self.path.name + ".prev"))  # keep the last run's journal
        self._fh = None

    def done(self) -> set[str]:
        return set(self._entries)

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def append(self, key: str, entry: dict) -> None:
        line = json.dumps({"schema": JOURNAL_SCHEMA, "key": key, **entry}, default=str)
        if self._fh is None:
            torn = self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across cases
            if torn:  # a line torn by a killed run: end it, so that the next entry gets a line of its own
                self._fh.write("\n")
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._entries[key] = {"key": key, **entry}

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _torn_tail(path: Path) -> bool:
    """True when the journal's last line is an incomplete JSON line."""
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        if lines:
            json.loads(lines[-1])
    except (OSError, json.JSONDecodeError):
        return True
    return False


def read_journal(path: str | Path, *, strict: bool = True) -> list[dict]:
    """The entries of a journal. A torn last line (the case in flight when the process died) is dropped;
    with strict=True any other unreadable line is an error."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        if strict:
            raise ResultFileError(f"{p}: no such file") from None
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):
                break  # torn final line
            if strict:
                raise ResultFileError(f"{p}: line {i} is not JSON ({err.msg}, column {err.colno})") from None
            continue
        if not isinstance(e, dict) or e.get("schema") != JOURNAL_SCHEMA or "key" not in e:
            if strict:
                raise ResultFileError(f"{p}: line {i} is not a pykernels journal entry (schema {JOURNAL_SCHEMA})")
            continue
        out.append(e)
    return out


# ---------------------------------------------------------------------------------------------------
# loading result files


@dataclass(frozen=True)
class Record:
    """One measured case, normalised from any result file."""

    machine: str        # device label, e.g. "cpu: AMD EPYC (2 threads)"
    device: str         # device type: cpu, cuda, ...
    family: str
    backend: str
    tier: str
    dtype: str
    shape: str          # the problem's label, e.g. M2048-N2048-K2048
    median_s: float
    p20_s: float
    p80_s: float
    flops: float
    bytes: float
    cv: float = 0.0
    rounds: int = 0
    ok: bool | None = True
    max_error: float | None = None
    pct_roofline: float | None = None
    peak_flops: float | None = None
    peak_bw: float | None = None
    copy_bw: float | None = None  # the bandwidth probe of the same run
    params: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = ""
    machine_id: str = ""  # the hardware identity (harness/device.py machine_id)
    vendor_ceiling: float | None = None  # the best vendor GEMM rate of that dtype (a lower, second roof)
    warning: str = ""     # the timer's sanity warning (implausible samples after re-measuring), "" = none
    cache: str = ""       # warm inputs within one core's L2 ("l2") or the last-level cache ("llc"), "" = memory
    bound: str = ""       # the roofline term of pct_roofline: compute, memory, compute (in cache); "" = unknown

    @property
    def case(self) -> tuple:
        return (self.machine, self.family, self.dtype, self.shape)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.median_s

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.median_s

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


def _num(ex: dict, k: str, where: str) -> float:
    v = ex.get(k)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ResultFileError(f"{where}: field '{k}' must be a finite number, got {v!r}")
    return float(v)


def record_from(ex: dict, machine_info: dict | None, where: str, source: str = "") -> Record:
    """A Record from one extra_info dict; ResultFileError naming the field when it does not fit."""
    missing = [k for k in REQUIRED if k not in ex]
    if missing:
        raise ResultFileError(f"{where}: missing field(s) {', '.join(missing)}")
    if ex["family"] not in FAMILIES:
        raise ResultFileError(f"{where}: unknown family {ex['family']!r} (known: {', '.join(FAMILIES)})")
    if ex["tier"] not in TIERS:
        raise ResultFileError(f"{where}: unknown tier {ex['tier']!r} (known: {', '.join(TIERS)})")
    med, p20, p80 = (_num(ex, k, where) for k in ("median_s", "p20_s", "p80_s"))
    if med <= 0 or not p20 <= med <= p80:
        raise ResultFileError(f"{where}: times must satisfy 0 < p20_s <= median_s <= p80_s, got "
                              f"{p20!r}, {med!r}, {p80!r}")
    flops, nbytes = _num(ex, "flops", where), _num(ex, "bytes", where)
    machine = ex.get("device_name")
    if not machine:
        dev = (machine_info or {}).get("pykernels", {}).get("device", {})
        machine = dev.get("label") or str(ex["device"])
    err = ex.get("max_error")
    return Record(
        machine=str(machine), device=str(ex["device"]).split(":")[0], family=ex["family"], backend=str(ex["backend"]),
        tier=ex["tier"], dtype=str(ex["dtype"]), shape=str(ex["shape"]), median_s=med, p20_s=p20, p80_s=p80,
        flops=flops, bytes=nbytes, cv=float(ex.get("cv") or 0.0), rounds=int(ex.get("rounds") or 0),
        ok=ex.get("ok"), max_error=math.inf if err == "inf" else err, pct_roofline=ex.get("pct_roofline"),
        peak_flops=ex.get("peak_flops"), peak_bw=ex.get("peak_bw"), copy_bw=ex.get("copy_bytes_per_s_this_run"),
        params=dict(ex.get("params") or {}),
        source=source,
        warning=str(ex.get("warning") or ""),
        cache=str(ex.get("cache") or ""),
        bound=str(ex.get("bound") or ""),
        vendor_ceiling=ex.get("vendor_ceiling_flops"),
        machine_id=str(ex.get("machine_id") or (machine_info or {}).get("pykernels", {}).get("device", {}).get("id")
                       or ""),
    )


def _load_json(p: Path) -> object:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ResultFileError(f"{p}: is a directory, expected a result file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{p}: cannot read ({type(e).__name__})") from None
    if not text.strip():
        raise ResultFileError(f"{p}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated string")
        hint = " (truncated?)" if truncated else ""
        raise ResultFileError(f"{p}: not valid JSON{hint}: {e.msg} at line {e.lineno}, column {e.colno}") from None


def load(path: str | Path) -> list[Record]:
    """The records of one result file (pytest-benchmark JSON or a journal). Benchmarks that are not
    pykernels cases are ignored; a file with none at all is an error."""
    p = Path(path)
    if p.suffix == ".jsonl":
        entries = read_journal(p)
        recs = [record_from(e["extra_info"], None, f"{p}: line for {e['key']}", str(p))
                for e in entries if isinstance(e.get("extra_info"), dict) and e.get("status") == "measured"]
        if not recs:
            raise ResultFileError(f"{p}: journal holds no measured cases")
        return recs
    doc = _load_json(p)
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        kind = type(doc).__name__ if not isinstance(doc, dict) else "an object without a 'benchmarks' list"
        raise ResultFileError(f"{p}: not a pytest-benchmark result file (got {kind})")
    machine_info = doc.get("machine_info") if isinstance(doc.get("machine_info"), dict) else {}
    recs = []
    for i, b in enumerate(doc["benchmarks"]):
        if not isinstance(b, dict):
            raise ResultFileError(f"{p}: benchmarks[{i}] is not an object")
        ex = b.get("extra_info")
        if not isinstance(ex, dict) or "family" not in ex or "backend" not in ex:
            continue  # another project's benchmark
        recs.append(record_from(ex, machine_info, f"{p}: benchmarks[{i}] ({b.get('name', '?')})", str(p)))
    if not recs:
        raise ResultFileError(f"{p}: no pykernels results in it ({len(doc['benchmarks'])} benchmarks, none with "
                              "pykernels extra_info: family, backend, ...)")
    return recs


def load_failures(path: str | Path) -> list[dict]:
    """The cases of a result file that crashed or hung (no timing, a reason): `pykernels_failed` of a
    pytest-benchmark JSON, or the journal's entries whose last status is crashed/hung. Malformed entries are
    skipped (the file has been validated by load() already)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        last = {e["key"]: e for e in read_journal(p)}
        items = [e for e in last.values() if e.get("status") in ("crashed", "hung")]
    else:
        doc = _load_json(p)
        items = doc.get("pykernels_failed") if isinstance(doc, dict) else None
        items = items if isinstance(items, list) else []
    keys = ("backend", "family", "dtype", "shape", "status", "reason")
    return [{k: str(e.get(k, "?")) for k in keys} for e in items if isinstance(e, dict)]


def keep_machines_apart(recs: list[Record]) -> list[Record]:
    """Two devices with the same label but different machine ids (say a Zen 4 and a Zen 5 that both call
    themselves "AMD EPYC") are different machines: their labels get the id appended, so that no table,
    penalty or roofline mixes them."""
    ids: dict[str, set] = {}
    for r in recs:
        ids.setdefault(r.machine, set()).add(r.machine_id)
    clash = {m for m, s in ids.items() if len(s) > 1}
    if not clash:
        return recs
    return [replace(r, machine=f"{r.machine} #{r.machine_id[:8] or 'unknown'}") if r.machine in clash else r
            for r in recs]


def load_many(paths) -> list[Record]:
    """Records of several files; for the same (machine, case, backend) a later file replaces an earlier one.
    Devices that share a label but not a machine id are kept apart (keep_machines_apart)."""
    merged: dict[tuple, Record] = {}
    for path in paths:
        for r in keep_machines_apart(load(path)):
            merged[(*r.case, r.machine_id, r.backend)] = r
    return keep_machines_apart(list(merged.values()))
