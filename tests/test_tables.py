"""pykernels.tables: terminal and Markdown tables, natural sort, and the live progress line (plain and bar)."""

from __future__ import annotations

import pytest

from pykernels import tables


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_plain_lines_with_elapsed_and_eta():
    out, clock = [], Clock()
    p = tables.Progress(4, label="sweep", tty=False, write=out.append, clock=clock)
    p.step("gemm float32 M1-N64-K64 native")
    clock.t += 10
    p.step("gemm float32 M4-N64-K64 native")
    clock.t += 20  # two cases in 30 s: 15 s each, two left -> 0:30
    p.step("gemm float32 M16-N64-K64 native")
    assert out == ["sweep [1/4] gemm float32 M1-N64-K64 native  (0:00 elapsed, ~? left)\n",
                   "sweep [2/4] gemm float32 M4-N64-K64 native  (0:10 elapsed, ~0:30 left)\n",
                   "sweep [3/4] gemm float32 M16-N64-K64 native  (0:30 elapsed, ~0:30 left)\n"]
    p.close()  # nothing to clear without a terminal
    assert len(out) == 3


def test_progress_bar_on_a_terminal_rewrites_one_line():
    out, clock = [], Clock()
    p = tables.Progress(2, label="x", tty=True, write=out.append, width=80, clock=clock)
    p.step("first")
    clock.t += 3725  # 1 h 2 min 5 s
    p.step("second")
    assert all(s.startswith("\r") and "\n" not in s and len(s) == 80 for s in out)
    assert "[" + " " * 20 + "] 1/2" in out[0] and "[" + "#" * 10 + " " * 10 + "] 2/2" in out[1]
    assert "1:02:05 elapsed, ~1:02:05 left  second" in out[1]
    p.note("FAILED case")  # a line that stays: the bar is cleared first
    assert out[-2].strip() == "" and out[-1] == "FAILED case\n"
    p.step("x" * 500)  # never wider than the terminal
    assert len(out[-1]) == 80


@pytest.mark.parametrize(("s", "text"), [(0, "0:00"), (59.6, "1:00"), (61, "1:01"), (3600, "1:00:00")])
def test_fmt_duration(s, text):
    assert tables.fmt_duration(s) == text


def test_table_alignment_and_colour():
    t = tables.table(["name", "value"], [["a", "1.00×"], ["bbbb", ("123.45×", "green")]], "lr", color=False)
    lines = [x for x in t.splitlines() if x.strip() and not set(x.strip()) <= {"─", " "}]
    assert lines[0].split() == ["name", "value"]
    assert len({len(x) for x in lines}) == 1  # the right-aligned column ends in one place
    assert lines[1].endswith("  1.00×") and "\x1b[" not in t
    assert "\x1b[32m" in tables.table(["v"], [[("1", "green")]], color=True)
    assert "[x]" in tables.table(["v"], [["[x]"]])  # cell text is never read as rich markup


def test_markdown_alignment_row():
    md = tables.markdown(["a", "b", "c"], [["x|y", "1", "2"]], "lrr")
    assert md.splitlines() == ["| a | b | c |", "|---|---:|---:|", "| x/y | 1 | 2 |"]


def test_natural_key_orders_numbers_by_value():
    labels = ["B8-Hq32-L4096", "B1-Hq32-L512", "B8-Hq4-L4096", "B16-Hq1-L1"]
    assert sorted(labels, key=tables.natural_key) == ["B1-Hq32-L512", "B8-Hq4-L4096", "B8-Hq32-L4096", "B16-Hq1-L1"]
    assert sorted(["x10", "X9", "x1.5"], key=tables.natural_key) == ["x1.5", "X9", "x10"]
