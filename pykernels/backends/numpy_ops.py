"""`numpy`: numpy's BLAS (OpenBLAS in the PyPI wheels) for gemm on CPU tensors, zero-copy through
tensor.numpy()."""

from __future__ import annotations

import contextlib
import platform

import torch

from .registry import Backend

# numpy's OpenBLAS picks SME kernels on ARMv9 cores with SME (Apple M4, and qemu's default "max" CPU), and
# their float32 matmul raises FP flags (divide by zero, overflow) on small finite inputs (numpy issues
# 28687, 29820), so np.matmul warns "... encountered in matmul". torch.matmul never warns about FP flags;
# on aarch64 they are ignored around the call, as there (elsewhere no errstate, whose context costs ~1 us
# per call, is entered).
_AARCH64 = platform.machine().lower() in ("aarch64", "arm64")


def _matmul_errstate():
    if _AARCH64:
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


class NumpyBackend(Backend):
    name = "numpy"
    tier = "vendor"
    devices = ("cpu",)
    description = "numpy.matmul (the BLAS numpy was built with)"
    # numpy has no bfloat16, and its float16 matmul is not BLAS: float32 only.
    dtypes = {("cpu", "gemm"): (torch.float32,)}

    def availability(self) -> str | None:
        try:
            import numpy  # noqa: F401
        except ImportError as e:
            return f"numpy is not installed ({e})"
        return None

    def gemm(self, a, b):
        import numpy as np

        with _matmul_errstate():
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))

    def linear(self, x, w):
        import numpy as np

        # w.T is a transposed view: BLAS gets it as a transposed operand (sgemm "NT"), no copy.
        with _matmul_errstate():
            return torch.from_numpy(np.matmul(x.numpy(), w.numpy().T))
