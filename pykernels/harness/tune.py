"""Per-machine tuning of the native CPU kernels' run-time settings: where and how far ahead the AVX-512
decode kernel prefetches its K/V rows (csrc/cpu/cpu.h: the level L1 / L2 per query-head grouping, a second
"near" L1 prefetch, the distance), how many tokens of one kv head it reads per step on a paged cache
(paged_step: 16, 32, 64 or 128) and how many rows of B a GEMV-like product (M = 1) reads per step
(gemv_streams: 4 or 8). Each CPU model ships with a default (measured on the CPUs the project ran
on); `pykernels tune` measures the choices on this machine instead, caches the best beside the peaks
(~/.cache/pykernels/tune-cpu-<machine id>.json, PYKERNELS_CACHE_DIR overrides) and the native backend applies
it when it first loads the extension (apply_cached), unless PYKERNELS_CPU_PREFETCH / _NEAR / _DISTANCE or
PYKERNELS_CPU_PAGED_STEP or PYKERNELS_CPU_GEMV_STREAMS set a value (those win) or PYKERNELS_CPU_TUNING=off.
Every decode result records the settings and their source (backend_info cpu_prefetch, cpu_prefetch_near,
cpu_prefetch_distance, cpu_prefetch_source; cpu_paged_step on a paged cache), every M = 1 GEMM result
cpu_gemv_streams.

How it measures (docs/harness.md "Tuning"): the issue-21 decode rows (B8 Hq32 L4096 D128; Hkv 8 and 32,
contiguous and paged 16, fp32 and bf16), their KV caches rotating through copies of 2x the last-level cache so
that every call streams them from memory, timed in turns with the native read probe (`_C.ReadPass`) in every
round; each call first switches to its setting (a few stores). A setting's figure for a row is the median over
rounds of its bytes/s over the read's of the same round. Four stages: the level per grouping (g = 1 and
g > 1) and the near prefetch, at the current distance; then the distance (8 / 16 / 32 KB) under the winners;
then, on the paged rows, the tokens per step (16 / 32 / 64 / 128) under those; then, on GEMV-like rows (M = 1,
N = 4096, K = 4096 and 11008, fp32 and bf16, the weights rotating likewise), 4 or 8 rows of B per step. A choice replaces the current one only when it reads at least MARGIN more
(geometric mean over all the rows of its stage): on a shared machine a change must beat the noise to be kept.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

TUNE_VERSION = 3  # 2: the GEMV rows per step (gemv_streams) joined; 3: decode's tokens per step on a paged cache
MARGIN = 0.02  # a setting must read >= 2% more than the current one (geometric mean over its rows)
LEVELS = ("l2", "l1")
DISTANCES = (8192, 16384, 32768)
GEMV_STREAMS = (4, 8)
PAGED_STEPS = (16, 32, 64, 128)
# setting -> (its environment variable, its _C setter, its _C.cpu_features() key; the source: key + "_source")
SETTINGS = {"level": ("PYKERNELS_CPU_PREFETCH", "set_cpu_prefetch", "stream_prefetch"),
            "near": ("PYKERNELS_CPU_PREFETCH_NEAR", "set_cpu_prefetch_near", "stream_prefetch_near"),
            "distance": ("PYKERNELS_CPU_PREFETCH_DISTANCE", "set_cpu_prefetch_distance", "stream_prefetch_distance"),
            "paged_step": ("PYKERNELS_CPU_PAGED_STEP", "set_cpu_paged_step", "paged_step"),
            "gemv_streams": ("PYKERNELS_CPU_GEMV_STREAMS", "set_cpu_gemv_streams", "gemv_streams")}


def level_name(l1_ungrouped: bool, l1_grouped: bool) -> str:
    """The cpu.h PrefetchLevel for L1 (True) or L2 for g = 1 and for g > 1."""
    return {(False, False): "l2", (True, True): "l1", (True, False): "l1-ungrouped",
            (False, True): "l1-grouped"}[(l1_ungrouped, l1_grouped)]


def level_parts(level: str) -> tuple[bool, bool]:
    """(L1 for g = 1, L1 for g > 1) of a level name."""
    return {"l2": (False, False), "l1": (True, True), "l1-ungrouped": (True, False),
            "l1-grouped": (False, True)}[level]


def cache_path(fp: dict | None = None) -> Path:
    """This machine's cache file: keyed by its hardware identity (the peaks' machine id), read without
    loading the extension (apply_cached runs while the backend loads it)."""
    from . import device

    fp = fp or device.identity("cpu")
    return device.cache_dir() / f"tune-{fp.get('type', 'cpu')}-{device.machine_id(fp)}.json"


def load(fp: dict | None = None) -> dict | None:
    """The cached tuning of this machine (and thread count), or None."""
    path = cache_path(fp)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != TUNE_VERSION or not isinstance(data.get("settings"), dict):
        return None
    data["cache"] = str(path)
    return data


def current(ext) -> dict:
    """The extension's tunable settings now ({'level', 'near', 'distance', 'paged_step', 'gemv_streams'}) and, under
    'sources', where each came from."""
    f = ext.cpu_features()
    d = {key: f[feat] for key, (_, _, feat) in SETTINGS.items()}
    d["sources"] = {key: f[feat + "_source"] for key, (_, _, feat) in SETTINGS.items()}
    return d


def _set(ext, settings: dict, source: str | None = None, sources: dict | None = None) -> None:
    """Set the given settings through the binding, which checks each (TypeError / ValueError naming it)."""
    for key, value in settings.items():
        if key in SETTINGS:
            getattr(ext, SETTINGS[key][1])(value, source=(sources or {}).get(key, source))


def apply(ext, settings: dict, source: str) -> dict:
    """Set the extension's settings from `settings`, each unless its environment variable holds a value other
    than auto (the override wins), with `source` as the reason cpu_features() reports. Returns what was set."""
    done = {k: v for k, v in settings.items()
            if k in SETTINGS and os.environ.get(SETTINGS[k][0], "auto") in ("", "auto")}
    _set(ext, done, source)
    return done


def apply_cached(ext) -> dict | None:
    """Apply this machine's cached tuning to the extension (the native backend calls this once, when it loads
    the extension). None when there is none or PYKERNELS_CPU_TUNING=off; a record that is not whole, or that
    the binding refuses, is not applied at all (what was set of it is set back), never raised."""
    if os.environ.get("PYKERNELS_CPU_TUNING", "").lower() == "off":
        return None
    try:
        from .device import cache_dir

        if not any(cache_dir().glob("tune-cpu-*.json")):  # no tuning on this machine: skip the identity
            return None
        data = load()
    except OSError:
        return None
    settings = data and data["settings"]
    if not isinstance(settings, dict) or set(settings) != set(SETTINGS):
        return None
    before = current(ext)
    try:
        return apply(ext, settings, f"pykernels tune ({data.get('measured_at', '?')}, {data['cache']})")
    except (TypeError, ValueError):
        _set(ext, {k: before[k] for k in SETTINGS}, sources=before["sources"])
        return None


# ---------------------------------------------------------------------------------------------------
# measuring


def _rows(B: int, L: int, dtypes) -> list:
    from ..kernels import DecodeProblem

    return [(dt, DecodeProblem(B, 32, hkv, L, 128, paged=paged)) for dt in dtypes for hkv in (8, 32)
            for paged in (False, True)]


def _gemv_rows(ks, dtypes) -> list:
    """GEMV-like rows: M = 1, N = 4096, K in ks (4096: the issue-21 row; 11008: an MLP's down projection)."""
    from ..kernels import GemmProblem

    return [(dt, GemmProblem(1, 4096, k)) for dt in dtypes for k in ks]


def _time_row(ext, dt: str, prob, settings: list[dict], reader, opts) -> list[float]:
    """% of the read of the same round (median over rounds) of each setting on one row (a decode or GEMM
    problem); a setting is {'level', 'near', 'distance'[, 'paged_step']} (decode) or {'gemv_streams'} (GEMM)."""
    from ..kernels import dtype_of
    from ..tokens import measure
    from . import timing

    tdt = dtype_of(dt)
    sets = measure.rotating_inputs(prob.make_inputs(tdt, "cpu", seed=0), measure.rotation_window_bytes())
    fn = measure.rotating_calls(prob.family, "native", sets, prob.call_kwargs())

    fn()
    # each setting set before its samples, outside the timed calls
    st_read, *st = timing.time_round_robin_cpu([reader.run] + [fn] * len(settings), opts,
                                               setups=[None] + [functools.partial(_set, ext, s) for s in settings])
    nb = prob.bytes(tdt)
    return [statistics.median((nb / tk) / (reader.nbytes / tr) for tk, tr in zip(s.samples, st_read.samples))
            for s in st]


def _geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 1.0


def measure(*, budget_s: float = 1.5, rounds: int = 6, B: int = 8, L: int = 4096,
            gemv_k: tuple = (4096, 11008), dtypes=("float32", "bfloat16"), log=print) -> dict:
    """Time the settings on this machine (module docstring) and return the tuning record: {'settings': the
    chosen {'level', 'near', 'distance', 'paged_step', 'gemv_streams'}, 'baseline': the settings before, 'stages':
    every row's % of the read per setting, 'gain': the chosen over the baseline (geometric mean over the rows) for
    decode (all rows; the paged step over the paged rows) and the GEMV, ...}.
    The extension's settings are restored before it returns (apply the result to keep it)."""
    import torch

    from ..backends.native import _ext
    from . import device, timing

    ext = _ext()  # the extension as the backend runs it: with this machine's cached tuning applied (the baseline)
    if not ext.cpu_features().get("avx512f") or ext.cpu_isa() not in ("avx512", "amx"):
        raise RuntimeError("nothing to tune: the prefetch settings belong to the AVX-512 decode kernel, and this "
                           f"process runs the {ext.cpu_isa()} tier")
    base = current(ext)
    reader = ext.ReadPass(None, torch.get_num_threads())
    opts = timing.TimingOptions(budget_s=budget_s, rse_target=0.0, min_rounds=rounds, warmup_s=0.2)
    rows = _rows(B, L, dtypes)
    gemv_rows = _gemv_rows(gemv_k, dtypes)
    distances = sorted(set(DISTANCES) | {base["distance"]})

    def grouped(p):
        return p.Hq != p.Hkv

    t0 = time.perf_counter()

    def stage(rows_, keys, settings, fmt):
        """Every row's % of the read under each setting ({'dtype label': {key: %}}), logged row by row."""
        pct = {}
        for dt, p in rows_:
            pct[f"{dt} {p.label()}"] = row = dict(zip(keys, _time_row(ext, dt, p, settings, reader, opts)))
            log(f"{dt:8s} {p.label():34s} " + "  ".join(f"{fmt(k)} {100 * v:4.1f}%" for k, v in row.items()))
        return pct

    def pick(score: dict, now_key):
        """The best-scoring key if it beats the one in force by the margin, else the one in force."""
        best = max(score, key=score.get)
        return best if score[best] >= (1 + MARGIN) * score[now_key] else now_key

    try:
        # stage 1: L1 / L2 and near off / on at the current distance, every row; the eight (level for g = 1,
        # level for g > 1, near) combinations scored over all rows
        keys1 = [(lv, nr) for lv in LEVELS for nr in (False, True)]
        pct1 = stage(rows, keys1, [{"level": lv, "near": nr, "distance": base["distance"]} for lv, nr in keys1],
                     lambda k: f"{k[0]}/{'near' if k[1] else 'one'}")

        def score(level: str, near: bool) -> float:
            l1u, l1g = level_parts(level)
            return _geomean(pct1[f"{dt} {p.label()}"][("l1" if (l1g if grouped(p) else l1u) else "l2", near)]
                            for dt, p in rows)

        options = {(level_name(a, b), nr): score(level_name(a, b), nr)
                   for a in (False, True) for b in (False, True) for nr in (False, True)}
        level, near = pick(options, (base["level"], base["near"]))
        # stage 2: the distance, under the chosen level and near
        pct2 = stage(rows, distances, [{"level": level, "near": near, "distance": d} for d in distances],
                     lambda d: f"{d // 1024} KB")
        dscore = {d: _geomean(x[d] for x in pct2.values()) for d in distances}
        distance = pick(dscore, base["distance"])
        # stage 3: tokens per step of one kv head on a paged cache, under the chosen prefetch settings
        paged_rows = [(dt, p) for dt, p in rows if p.paged]
        steps = sorted(set(PAGED_STEPS) | {base["paged_step"]})
        pct_s = stage(paged_rows, steps, [{"level": level, "near": near, "distance": distance, "paged_step": u}
                                          for u in steps], lambda u: f"step {u}")
        sscore = {u: _geomean(x[u] for x in pct_s.values()) for u in steps}
        paged_step = pick(sscore, base["paged_step"])
        # stage 4: rows of B per step of a GEMV-like product (M = 1, B [K, N])
        pct3 = stage(gemv_rows, GEMV_STREAMS, [{"gemv_streams": u} for u in GEMV_STREAMS], lambda u: f"{u} rows")
        gscore = {u: _geomean(x[u] for x in pct3.values()) for u in GEMV_STREAMS}
        gemv_streams = pick(gscore, base["gemv_streams"])
        stages = {
            "levels_near": {r: {f"{lv}/{'near' if nr else 'one'}": round(v, 4) for (lv, nr), v in d.items()}
                            for r, d in pct1.items()},
            "distance": {r: {str(k): round(v, 4) for k, v in d.items()} for r, d in pct2.items()},
            "paged_step": {r: {str(k): round(v, 4) for k, v in d.items()} for r, d in pct_s.items()},
            "gemv_streams": {r: {str(k): round(v, 4) for k, v in d.items()} for r, d in pct3.items()},
        }
    finally:  # the settings as they were, sources included (whatever set them: default, override, cache)
        _set(ext, {k: base[k] for k in SETTINGS}, sources=base["sources"])
    chosen = {"level": level, "near": near, "distance": distance, "paged_step": paged_step, "gemv_streams": gemv_streams}
    # stage 2 ran under the chosen level and near: its ratio at the old distance is stage 1's gain's base
    gain1 = options[(level, near)] / options[(base["level"], base["near"])]
    gain2 = dscore[distance] / dscore[base["distance"]]
    fp = device.fingerprint("cpu")
    return {
        "version": TUNE_VERSION,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"id": fp["id"], "name": fp.get("name"), "family_model": fp.get("family_model"),
                    "threads": torch.get_num_threads()},
        "settings": chosen,
        "baseline": base,
        "gain": {"decode": round(gain1 * gain2, 4), "paged_step": round(sscore[paged_step] / sscore[base["paged_step"]], 4),
                 "gemv": round(gscore[gemv_streams] / gscore[base["gemv_streams"]], 4)},
        "scores": {"levels_near": {f"{lv}/{'near' if nr else 'one'}": round(v, 4) for (lv, nr), v in options.items()},
                   "distance": {str(d): round(v, 4) for d, v in dscore.items()},
                   "paged_step": {str(u): round(v, 4) for u, v in sscore.items()},
                   "gemv_streams": {str(u): round(v, 4) for u, v in gscore.items()}},
        "margin": MARGIN,
        "rows": [f"{dt} {p.label()}" for dt, p in rows],
        "gemv_rows": [f"{dt} {p.label()}" for dt, p in gemv_rows],
        "stages": stages,
    }


def save(record: dict, fp: dict | None = None) -> Path:
    from .device import write_cache

    return write_cache(cache_path(fp), record)
