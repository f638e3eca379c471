"""Decode's software-prefetch settings against each other, in turns within one process, on this CPU.

    python tools/prefetch_ab.py --threads 2 --rounds 8                  # second (near) prefetch off vs on
    python tools/prefetch_ab.py --threads 1 --level l2,l1 --near on     # prefetch level L2 vs L1

For each of the issue-21 decode rows (B8 Hq32 L4096 D128; Hkv 8 and 32, contiguous and paged 16, fp32 and
bf16) every round runs each setting once, in alternating order, with `_C.set_cpu_prefetch` /
`_C.set_cpu_prefetch_near`: the native read probe (`_C.ReadPass`), then two prepared native calls, and
records the calls' bytes/s over the read's bytes/s of that round. Prints, per row and setting, the median over
rounds of that ratio (% of the read): the way the defaults of cpu.h `stream_prefetch` and
`stream_prefetch_near` were chosen on Zen 5 (notes/cpu_decode.md), to be repeated on a CPU where they were
not measured before changing its default. The process's own settings are restored at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import pykernels as pk
from pykernels import _C


def case(hkv: int, paged: bool, dt: torch.dtype, B: int, L: int, Hq: int = 32, D: int = 128, bs: int = 16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g).to(dt)
    lens = torch.full((B,), L, dtype=torch.int32)
    if paged:
        nb = B * L // bs
        k, v = (torch.randn(nb, hkv, bs, D, generator=g).to(dt) for _ in range(2))
        table = torch.randperm(nb, generator=g, dtype=torch.int32).reshape(B, L // bs)
        kw = {"q": q, "k_cache": k, "v_cache": v, "context_lens": lens, "block_table": table}
    else:
        k, v = (torch.randn(B, hkv, L, D, generator=g).to(dt) for _ in range(2))
        kw = {"q": q, "k_cache": k, "v_cache": v, "context_lens": lens}
    return pk.ops.prepare("decode", backend="native", **kw), 2 * k.numel() * k.element_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch / native threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--level", default=None, help="comma-separated prefetch levels to compare (l1, l2, l1-ungrouped)")
    ap.add_argument("--near", default="off,on", help="comma-separated near settings to compare (off, on)")
    ap.add_argument("--B", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--L", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--read-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = _C.cpu_features()
    level0, near0 = feats["stream_prefetch"], bool(feats["stream_prefetch_near"])
    levels = args.level.split(",") if args.level else [level0]
    if any(x not in ("on", "off") for x in args.near.split(",")):
        ap.error("--near takes off and on")
    nears = [x == "on" for x in args.near.split(",")]
    settings = [(lv, nr) for lv in levels for nr in nears]
    reader = _C.ReadPass(args.read_bytes, torch.get_num_threads())
    print(f"# {len(settings)} settings, {args.rounds} rounds, {torch.get_num_threads()} threads; "
          f"defaults here: level {level0}, near {'on' if near0 else 'off'}", flush=True)
    try:
        for dt in (torch.float32, torch.bfloat16):
            for hkv in (8, 32):
                for paged in (False, True):
                    fn, nbytes = case(hkv, paged, dt, args.B, args.L)
                    fn()
                    got = {s: [] for s in settings}
                    reads = []
                    for r in range(args.rounds):
                        for lv, nr in settings if r % 2 == 0 else settings[::-1]:
                            _C.set_cpu_prefetch(lv)
                            _C.set_cpu_prefetch_near(nr)
                            t = time.perf_counter()
                            reader.run()
                            rd = reader.nbytes / (time.perf_counter() - t)
                            t = time.perf_counter()
                            fn()
                            fn()
                            got[(lv, nr)].append(2 * nbytes / (time.perf_counter() - t) / rd)
                            reads.append(rd)
                    label = f"{str(dt).removeprefix('torch.'):8s} Hkv {hkv:2d} {'paged16' if paged else 'contig '}"
                    cells = "  ".join(f"{lv}/{'near' if nr else 'one'} {100 * statistics.median(v):3.0f}%"
                                      for (lv, nr), v in got.items())
                    print(f"{label} read ~{statistics.median(reads) / 1e9:5.1f} GB/s: {cells}", flush=True)
                    del fn
    finally:
        _C.set_cpu_prefetch(level0)
        _C.set_cpu_prefetch_near(near0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
