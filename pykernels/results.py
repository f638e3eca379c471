"""Result files for analysis: the public entry point to what `pykernels report` reads.

    from pykernels.results import to_dataframe
    df = to_dataframe(["results/cpu-zen4-2c/quick.json"])      # needs pandas: pip install 'pykernels[pandas]'
    df[df.family == "gemm"].pivot_table(index=["dtype", "M", "N", "K"], columns="backend", values="speedup_vs_native")

One row per (device, case, backend), with the shape's parameters as columns (M, N, K, B, Hq, Hkv, S, L, D,
causal, paged, block_size, ragged: empty where a family has none), the timing statistics, throughput, % of
peak, and the speedup over native and over the best vendor backend of the same case (the report's
convention: speedup = throughput(X) / throughput(ref), penalty = 1 − speedup; `noise_vs_*` True when the
p20–p80 ranges overlap). The loading itself (pytest-benchmark JSON or a journal, errors as
ResultFileError) is pykernels.harness.results.
"""

from __future__ import annotations

from .harness.results import Record, ResultFileError, load, load_many

__all__ = ["Record", "ResultFileError", "load", "load_many", "to_dataframe"]


def _pandas():
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("pykernels.results.to_dataframe needs pandas: pip install 'pykernels[pandas]' "
                          f"(or pip install pandas) ({e})") from None
    return pd


def to_dataframe(paths, *, records: list[Record] | None = None):
    """A pandas DataFrame of result files (a path or a list of paths; several files merge as in `pykernels
    report`). Columns as the report's CSV (`pykernels report --csv`), parameters typed (ints, bools)."""
    pd = _pandas()
    import csv
    import io

    from . import report

    if records is None:
        records = load_many([paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else paths)
    rows = report.penalty_rows(records)
    params = report.param_columns([r.rec for r in rows])
    out = []
    reader = csv.DictReader(io.StringIO(report.table_csv(rows)))
    for row, line in zip(rows, reader):
        sp = report.shape_params(row.rec)
        d: dict = dict(line)
        for k in params:
            d[k] = sp.get(k)
        for k in ("median_s", "p20_s", "p80_s", "cv", "flops", "bytes", "flops_per_s", "bytes_per_s", "pct_roofline",
                  "max_error", "speedup_vs_native", "penalty_vs_native", "speedup_vs_vendor", "penalty_vs_vendor"):
            d[k] = float(d[k]) if d.get(k) not in (None, "") else None
        d["rounds"] = int(d["rounds"]) if d.get("rounds") else 0
        for k in ("noise_vs_native", "noise_vs_vendor"):
            d[k] = None if d[k] == "" else d[k] == "True"
        d["ok"] = row.rec.ok
        d["best_vendor"] = d["best_vendor"] or None
        out.append(d)
    cols = [*report.CSV_FIELDS[:4], *params, *report.CSV_FIELDS[4:]]
    return pd.DataFrame(out, columns=cols)
