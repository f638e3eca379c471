"""Correctness check of one output against the float64 reference with the dtype-aware tolerance rule
(kernels/_common.py). Shared by the tests, the benchmark harness and the conformance run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import FAMILIES
from ..kernels._common import rel_error, tolerance


@dataclass
class Expected:
    """The float64 reference of one problem's inputs, torch's own error at the input dtype, and the
    resulting tolerance. Compute once per (problem, inputs); check any number of outputs."""

    reference: torch.Tensor
    baseline_error: float
    tolerance: float
    dtype: torch.dtype

    def error(self, out: torch.Tensor) -> float:
        return rel_error(out, self.reference)

    def check(self, out: torch.Tensor) -> tuple[float, bool]:
        err = self.error(out)
        return err, err <= self.tolerance

    def assert_close(self, out: torch.Tensor, what: str = "output") -> float:
        err, ok = self.check(out)
        if not ok:
            raise AssertionError(f"{what}: relative error {err:.3g} exceeds the tolerance {self.tolerance:.3g} "
                                 f"(2 x torch's own {self.baseline_error:.3g} + floor, dtype {self.dtype})")
        return err


def expected(problem, inputs: dict) -> Expected:
    fam = FAMILIES[problem.family]
    kw = problem.call_kwargs()
    ref = fam.reference(**inputs, **kw)
    dtype = next(v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    base = rel_error(fam.baseline(**inputs, **kw), ref)
    return Expected(reference=ref, baseline_error=base, tolerance=tolerance(dtype, base), dtype=dtype)
