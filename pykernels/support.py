"""What each backend supports: backend × family × dtype × device, with the reason for each gap.

Read from the backends' own declarations (`Backend.supports`, the same check the sweeps use to skip a
case), so the table cannot disagree with what a run does. Shape limits (head dims, operand sizes) are
not in it: they depend on the shape and are reported per case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .tables import markdown, table

FAMILIES = ("gemm", "attention", "decode")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class SupportRow:
    backend: str
    tier: str
    device: str
    family: str
    dtypes: dict          # dtype name -> None (supported) or the reason it is not
    available: bool       # usable on this machine now
    unavailable_reason: str | None

    def gaps(self) -> list[str]:
        """The distinct reasons of the unsupported dtypes, in dtype order."""
        return list(dict.fromkeys(r for r in self.dtypes.values() if r))


def support_rows(devices=DEVICES, backends=None) -> list[SupportRow]:
    """One row per (backend, device, family) for every registered backend (built-in and plugins), whether or not
    it is available here; `devices`: the device types to list."""
    import torch

    from .backends import registry

    out = []
    for b in (registry.all_backends().values() if backends is None else backends):
        info = registry.info(b)
        for dev in devices:
            for fam in FAMILIES:
                reasons = {}
                for dt in DTYPES:
                    try:
                        reasons[dt] = b.supports(fam, dev, getattr(torch, dt))
                    except Exception as e:  # noqa: BLE001 - a plugin's declaration may be broken; say so
                        reasons[dt] = f"supports() failed: {type(e).__name__}: {e}"
                out.append(SupportRow(b.name, b.tier, dev, fam, reasons, info.available, info.reason))
    return out


HEADERS = ("backend", "tier", "device", "family", *DTYPES, "why not")


def _cells(r: SupportRow, color: bool) -> list:
    cells = [r.backend, r.tier, r.device, r.family]
    for dt in DTYPES:
        ok = r.dtypes[dt] is None
        cells.append(("yes", "green") if ok else ("no", "red"))
    why = "; ".join(_merge_dtype_gaps([_short(g) for g in r.gaps()]))
    if any(v is None for v in r.dtypes.values()) and not r.available:
        why = (why + "; " if why else "") + f"unavailable here: {r.unavailable_reason}"
    cells.append(why)
    return cells


_DTYPE_GAP = re.compile(r"^does not support dtype (\w+) for (.*)$")


def _merge_dtype_gaps(reasons: list[str]) -> list[str]:
    """'does not support dtype bfloat16 for X; ... dtype float16 for X' -> 'does not support dtypes bfloat16,
    float16 for X' (one reason per row reads at a glance)."""
    out, merged = [], {}
    for r in reasons:
        m = _DTYPE_GAP.match(r)
        if m:
            if m.group(2) not in merged:
                merged[m.group(2)] = []
                out.append(m.group(2))
            merged[m.group(2)].append(m.group(1))
        else:
            out.append(r)
    return [f"does not support dtype{'s' if len(merged[x]) > 1 else ''} {', '.join(merged[x])} for {x}"
            if x in merged else x for x in out]


def _short(reason: str) -> str:
    """Drop the "backend 'x' " prefix every reason starts with: the row already names it."""
    if reason.startswith("backend '") and "' " in reason:
        return reason.split("' ", 1)[1]
    return reason


def render(rows: list[SupportRow], fmt: str = "terminal", color: bool = False) -> str:
    body = [_cells(r, color) for r in rows]
    note = ("yes: the backend declares this (family, dtype, device) and runs it when available; shape limits "
            "(head dims, operand sizes) are checked per case. Built-in and installed plugin backends.")
    if fmt == "md":
        return markdown(HEADERS, body, "llll" + "lll" + "l") + "\n" + note + "\n"
    cuts = [i for i in range(1, len(rows)) if (rows[i].backend, rows[i].device) != (rows[i - 1].backend,
                                                                                     rows[i - 1].device)]
    return table(HEADERS, body, title="backend support (family × dtype × device)", color=color,
                 sections=cuts) + note + "\n"
