"""`numpy`: numpy's BLAS (OpenBLAS in the PyPI wheels) for gemm on CPU tensors, zero-copy through
tensor.numpy()."""

from __future__ import annotations

import torch

from .registry import Backend


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

        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))

    def linear(self, x, w):
        import numpy as np

        # w.T is a transposed view: BLAS gets it as a transposed operand (sgemm "NT"), no copy.
        return torch.from_numpy(np.matmul(x.numpy(), w.numpy().T))
