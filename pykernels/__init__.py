"""pykernels: measure the abstraction penalty of Triton, torch.compile, framework ops and vendor ports
against hand-written native kernels and vendor libraries, for GEMM, attention and LLM decoding."""

from .backends import Backend, BackendInfo, BackendUnavailableError, UnsupportedError, register
from .backends import backends as _backend_infos
from .ops import attention, decode, gemm, prepare

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
    "prepare",
    "register",
]
