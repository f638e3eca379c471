"""Source prelude for child-process tests that put a kernel's inputs right before an inaccessible page:
`at_guard(shape, dtype)` returns a tensor whose last byte is the last byte before a PROT_NONE page, so a
read past the end crashes the child (run the script with `python -c PRELUDE + body` and check its exit)."""

PRELUDE = r"""
import ctypes, mmap, sys
import torch
import pykernels as pk
from pykernels import _C

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
keep = []


def at_guard(shape, dtype):
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.tensor([], dtype=dtype).element_size()
    body = -(-nbytes // PAGE) * PAGE
    m = mmap.mmap(-1, body + PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base + body, PAGE, 0) == 0, ctypes.get_errno()
    keep.append(m)
    return torch.frombuffer(m, dtype=dtype, count=n, offset=body - nbytes).view(shape)
"""


def run(body: str):
    """Runs PRELUDE + body in a child Python; returns the CompletedProcess (a crash is a non-zero exit)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=300)
