"""Tables and progress lines for people: one place that decides how pykernels prints.

- `table(headers, rows, align)`: a terminal table through rich (right-aligned numbers, colour only when the
  output is a terminal); `markdown(headers, rows, align)`: the same rows as a Markdown table (only on request:
  `--md`).
- `natural_key`: shapes sort by their numbers (M1, M4, M16, M2048), not as text (M1, M16, M2048, M4).
- `Progress`: which case runs, how many are left, elapsed and estimated time left; a bar rewritten in place
  on a terminal, one plain line per case otherwise (logs, CI).

The speedup convention shared by every report (docs/harness.md, "Reports"): speedup of X over a reference
= throughput(X) / throughput(ref) = time(ref) / time(X), printed as `1.23×`; the penalty (the "tax") is
1 − speedup = 1 − throughput(X) / throughput(ref) (docs/design.md), negative when X is faster.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence

_NUM = re.compile(r"(\d+(?:\.\d+)?)")


def natural_key(s: str) -> tuple:
    """Sort key that orders the numbers inside a label by value: M1-N4096 < M4-N4096 < M16-N4096 < M2048-N2048."""
    out = []
    for i, part in enumerate(_NUM.split(str(s))):
        out.append((1, float(part), "") if i % 2 else (0, 0.0, part.lower()))
    return tuple(out)


def isatty(stream=None) -> bool:
    """True when `stream` (default stdout) is a terminal and colour is not switched off (NO_COLOR)."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty()) and "NO_COLOR" not in os.environ
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# speedup arithmetic and text


def speedup(t_x: float, t_ref: float) -> float:
    """Speedup of X over the reference: throughput(X) / throughput(ref) = t_ref / t_x for the same work."""
    if not (t_x > 0 and t_ref > 0):
        raise ValueError("times must be positive")
    return t_ref / t_x


def penalty_of(s: float) -> float:
    """The penalty ("tax") of a speedup s: 1 − throughput(X) / throughput(ref) = 1 − s; negative = X faster."""
    return 1.0 - s


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of positive ratios (the mean of speedups over shapes); nan when there are none."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan
    if any(not (v > 0) or not math.isfinite(v) for v in vals):
        raise ValueError("geomean needs positive finite values")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def fmt_speedup(s: float | None, noise: bool = False) -> str:
    """1.234 -> '1.23×'; 35.24 -> '35.2×'; 412.3 -> '412×'; 0.0123 -> '0.012×'; inside the noise '(~1.02×)'."""
    if s is None or not math.isfinite(s):
        return "—"
    txt = f"{s:.0f}×" if s >= 100 else f"{s:.1f}×" if s >= 10 else f"{s:.2f}×" if s >= 0.1 else f"{s:.2g}×"
    return f"(~{txt})" if noise else txt


def fmt_penalty(s: float | None) -> str:
    """The penalty of a speedup as a signed percentage: 0.92× -> '+8.0%', 2× -> '-100%'."""
    if s is None or not math.isfinite(s):
        return "—"
    p = 100.0 * penalty_of(s)
    return f"{p:+.1f}%" if abs(p) < 1000 else f"{p:+.0f}%"


# ---------------------------------------------------------------------------------------------------
# tables

Cell = "str | tuple[str, str]"  # text, or (text, rich style) for a coloured cell


def _text(c) -> str:
    return c[0] if isinstance(c, tuple) else str(c)


def table(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None, *, title: str | None = None,
          color: bool = False, sections: Sequence[int] = ()) -> str:
    """A terminal table (rich): `align` one letter per column, 'l' or 'r' (default: left). A cell is text or
    (text, style); the style is used only when `color`. `sections`: row indices before which a rule is drawn."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    align = (align or "l" * len(headers)).ljust(len(headers), "l")
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False, pad_edge=False,
              header_style="bold" if color else "", title_style="bold" if color else "")
    for h, a in zip(headers, align):
        t.add_column(h, justify="right" if a == "r" else "left", no_wrap=True, overflow="fold")
    cut = set(sections)
    for i, r in enumerate(rows):
        if i in cut and i:
            t.add_section()
        t.add_row(*[Text(_text(c), style=(c[1] if color and isinstance(c, tuple) else "")) for c in r])
    buf = io.StringIO()
    con = Console(file=buf, width=1000, force_terminal=color, color_system="standard" if color else None,
                  no_color=not color, highlight=False, emoji=False, soft_wrap=False, legacy_windows=False)
    con.print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def markdown(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """The same rows as a Markdown table ('|' in a cell becomes '/')."""
    align = (align or "l" * len(headers)).ljust(len(headers), "l")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_text(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# progress


def fmt_duration(s: float) -> str:
    s = max(0, round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Which case runs, how many are left, elapsed, estimated time left.

    `step(what)` before each case. On a terminal (`tty`) the line is a bar rewritten in place (`\\r`);
    otherwise one plain line per case. The estimate is the mean time of the cases done so far times the
    cases left ("?" before the first one finishes). `write(text)` receives the text (default: stderr)."""

    def __init__(self, total: int, *, label: str = "", tty: bool | None = None,
                 write: Callable[[str], object] | None = None, width: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.clock = max(0, int(total)), label, clock
        self.done = 0
        self.t0 = clock()
        self._write = write or (lambda s: (sys.stderr.write(s), sys.stderr.flush()))
        self.tty = isatty(sys.stderr) if tty is None else tty
        self.width = width or _term_width()
        self._open = False  # a rewritten line is on screen

    def line(self, what: str) -> str:
        elapsed = self.clock() - self.t0
        n = self.done + 1
        left = self.total - self.done
        eta = "?" if self.done == 0 else fmt_duration(elapsed / self.done * left)
        count = f"{n}/{self.total}".rjust(2 * len(str(self.total)) + 1)
        head = f"{self.label} " if self.label else ""
        times = f"{fmt_duration(elapsed)} elapsed, ~{eta} left"
        if self.tty:
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(20 * frac)
            return f"{head}[{bar:<20}] {count}  {times}  {what}"
        return f"{head}[{count}] {what}  ({times})"

    def step(self, what: str) -> None:
        """Announce the next case (call before running it)."""
        text = self.line(what)
        if self.tty:
            text = text[: self.width - 1]
            self._write("\r" + text.ljust(self.width - 1))
            self._open = True
        else:
            self._write(text + "\n")
        self.done += 1

    def note(self, text: str) -> None:
        """A line that stays (a failure, say), printed above the bar on a terminal."""
        self.close()
        self._write(text + "\n")

    def close(self) -> None:
        """Clear the bar's line (terminal); nothing otherwise."""
        if self._open:
            self._write("\r" + " " * (self.width - 1) + "\r")
            self._open = False


def _term_width() -> int:
    try:
        return max(40, os.get_terminal_size(sys.stderr.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        return 120
