"""pykernels: measure the abstraction penalty of Triton, torch.compile, framework ops and vendor ports
against hand-written native kernels and vendor libraries, for GEMM, attention and LLM decoding."""

import os as _os

# OpenBLAS (numpy's BLAS, loaded by `import torch`) keeps its worker threads spinning for ~0.1 s after
# every call; on a machine with few cores they steal the cores from whatever is timed next (measured:
# native bf16 GEMM 2048^3 took 60-91 ms right after a numpy matmul instead of 41). Make them sleep at
# once, unless the user chose otherwise. Takes effect only if numpy was not loaded before pykernels;
# the CPU timer also waits TimingOptions.settle_s before measuring (docs/harness.md).
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .backends import Backend, BackendInfo, BackendUnavailableError, UnsupportedError, register
from .backends import backends as _backend_infos
from .ops import attention, decode, gemm, linear, prepare

__version__ = "0.1.0"


def backends() -> list[BackendInfo]:
    """Every known backend: name, tier, devices, available (bool), reason when not."""
    return _backend_infos()


__all__ = [
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "UnsupportedError",
    "__version__",
    "attention",
    "backends",
    "decode",
    "gemm",
    "linear",
    "prepare",
    "register",
]
