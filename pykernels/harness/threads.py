"""Thread count of a run: pin it (`--threads N` / `--pk-threads N`) and record what was actually used.

Three pools decide how many threads a CPU case runs on: torch's intra-op pool (torch.set_num_threads), the
BLAS / OpenMP runtimes loaded in the process (torch's libgomp or libiomp, numpy's OpenBLAS; reached through
threadpoolctl) and the OpenMP runtime of the native kernels and probes (pykernels._C.set_num_threads). A
pinned run sets all three; every run records them with the CPU affinity of the process (the cores the OS
lets it use), so that two results with different thread counts are never compared unawares.
"""

from __future__ import annotations

import os

_LIMITER = None  # the threadpoolctl limiter of a pinned run, kept so that the limits hold for the whole run
_BEFORE: dict | None = None  # torch and native thread counts before the first pin_threads


def check_threads(n) -> int:
    """`n` as a thread count >= 1, else ValueError naming the argument."""
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            n = int(str(n), 10)
        except ValueError:
            raise ValueError(f"threads must be a positive integer, got {n!r}") from None
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    return n


def affinity() -> list[int] | None:
    """The CPUs this process may run on (os.sched_getaffinity), None where the OS does not say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def pin_threads(n) -> dict:
    """Run torch, the BLAS/OpenMP pools and the native kernels on `n` threads from now on; returns state()."""
    global _LIMITER, _BEFORE
    n = check_threads(n)
    import torch

    if _BEFORE is None:
        _BEFORE = state()
    if _LIMITER is not None:
        _LIMITER.restore_original_limits()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        _LIMITER = threadpool_limits(limits=n)
    except ImportError:  # a core dependency, but a stripped install only loses the BLAS pools' limit
        _LIMITER = None
    try:
        from .. import _C

        _C.set_num_threads(n)
    except (ImportError, AttributeError):
        pass  # no extension: the native backend is unavailable anyway
    st = state()
    st["requested"] = n
    return st


def state() -> dict:
    """Thread counts in use now: torch, native (OpenMP of pykernels._C), each BLAS/OpenMP pool, the affinity."""
    out: dict = {"requested": None, "affinity": affinity()}
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except ImportError:
        out["torch"] = None
    try:
        from .. import _C

        out["native"] = _C.get_num_threads()
    except (ImportError, AttributeError):
        out["native"] = None
    try:
        from threadpoolctl import threadpool_info

        out["pools"] = [{"api": p.get("user_api"), "library": p.get("internal_api"),
                         "file": os.path.basename(p.get("filepath") or ""), "threads": p.get("num_threads")}
                        for p in threadpool_info()]
    except ImportError:
        out["pools"] = None
    return out


def unpin_threads() -> None:
    """Undo pin_threads: the thread counts from before it (for in-process runs such as pytester)."""
    global _LIMITER, _BEFORE
    if _LIMITER is not None:
        _LIMITER.restore_original_limits()
        _LIMITER = None
    if _BEFORE is None:
        return
    import torch

    if _BEFORE.get("torch"):
        torch.set_num_threads(_BEFORE["torch"])
    if _BEFORE.get("native"):
        from .. import _C

        _C.set_num_threads(_BEFORE["native"])
    _BEFORE = None
