"""Decode's software-prefetch settings against each other, in turns within one process, on this CPU.

    python tools/prefetch_ab.py --threads 2 --rounds 8                  # second (near) prefetch off vs on
    python tools/prefetch_ab.py --threads 1 --level l2,l1 --near on     # prefetch level L2 vs L1

For each of the issue-21 decode rows (B8 Hq32 L4096 D128; Hkv 8 and 32, contiguous and paged 16, fp32 and
bf16), built and timed as tools/issue6.py does (inputs from the problem, the KV cache rotating through copies
of 2x the last-level cache, `timing.time_round_robin_cpu`), every round calls the native read probe
(`_C.ReadPass`) and the prepared native call once per setting, each call first switching to its setting with
`_C.set_cpu_prefetch` / `_C.set_cpu_prefetch_near` (two stores, well under a microsecond of a call of
milliseconds). Prints, per row and setting, the median over rounds of its bytes/s over the read's of that
round (% of the read, issue6.paired): the way the defaults of cpu.h `stream_prefetch` and
`stream_prefetch_near` were chosen on Zen 5 (notes/cpu_decode.md), to be repeated on a CPU where they were
not measured before changing its default. The process's own settings are restored at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pykernels import _C
from pykernels.harness import timing
from pykernels.kernels import DecodeProblem, dtype_of
from pykernels.tokens import measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from issue6 import paired  # tools/ is not a package: from this directory


def setting_call(fn, level: str, near: bool):
    """fn() under the given prefetch settings (read by the decode call when it splits its work)."""

    def call():
        _C.set_cpu_prefetch(level)
        _C.set_cpu_prefetch_near(near)
        return fn()

    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch / native threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per row (at least; more while the budget lasts)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of round-robin timing per row")
    ap.add_argument("--level", default=None, help="comma-separated prefetch levels to compare (l1, l2, l1-ungrouped)")
    ap.add_argument("--near", default="off,on", help="comma-separated near settings to compare (off, on)")
    ap.add_argument("--B", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--read-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(x not in ("on", "off") for x in args.near.split(",")):
        ap.error("--near takes off and on")
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = _C.cpu_features()
    level0, near0 = feats["stream_prefetch"], bool(feats["stream_prefetch_near"])
    levels = args.level.split(",") if args.level else [level0]
    settings = [(lv, nr == "on") for lv in levels for nr in args.near.split(",")]
    reader = _C.ReadPass(args.read_bytes, torch.get_num_threads())
    window = measure.rotation_window_bytes()
    opts = timing.TimingOptions(budget_s=args.budget, rse_target=0.0, min_rounds=args.rounds, warmup_s=0.2)
    print(f"# {len(settings)} settings, {torch.get_num_threads()} threads; "
          f"defaults here: level {level0}, near {'on' if near0 else 'off'}", flush=True)
    try:
        for dtype in ("float32", "bfloat16"):
            for hkv in (8, 32):
                for paged in (False, True):
                    p = DecodeProblem(args.B, 32, hkv, args.L, 128, paged=paged)
                    dt = dtype_of(dtype)
                    sets = measure.rotating_inputs(p.make_inputs(dt, "cpu", seed=0), window)
                    fn = measure.rotating_calls(p.family, "native", sets, p.call_kwargs())
                    fn()
                    st_read, *st = timing.time_round_robin_cpu(
                        [reader.run] + [setting_call(fn, lv, nr) for lv, nr in settings], opts)
                    cells = "  ".join(
                        f"{lv}/{'near' if nr else 'one'} "
                        f"{100 * paired(p.bytes(dt), s.samples, reader.nbytes, st_read.samples):3.0f}%"
                        for (lv, nr), s in zip(settings, st))
                    print(f"{dtype:8s} {p.label():34s} read ~{reader.nbytes / st_read.median_s / 1e9:5.1f} GB/s, "
                          f"{st_read.rounds} rounds: {cells}", flush=True)
                    del fn, sets
    finally:
        _C.set_cpu_prefetch(level0)
        _C.set_cpu_prefetch_near(near0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
