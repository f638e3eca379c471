"""Problem specs per family: shapes, FLOP and byte counts, seeded inputs, float64 reference.

Nothing here times anything or knows about backends; tests, benchmarks and the conformance run all
import their problems and references from here.
"""

from . import attention, decode, gemm
from ._common import DTYPES, dtype_name, dtype_of, rel_error, tolerance
from .attention import AttentionProblem
from .decode import DecodeProblem
from .gemm import GemmProblem

FAMILIES = {"gemm": gemm, "attention": attention, "decode": decode}
PROBLEMS = {"gemm": GemmProblem, "attention": AttentionProblem, "decode": DecodeProblem}

__all__ = [
    "DTYPES",
    "FAMILIES",
    "PROBLEMS",
    "AttentionProblem",
    "DecodeProblem",
    "GemmProblem",
    "attention",
    "decode",
    "dtype_name",
    "dtype_of",
    "gemm",
    "rel_error",
    "tolerance",
]
