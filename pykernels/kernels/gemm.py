"""gemm: C[M,N] = A[M,K] . B[K,N]. Problem spec, FLOP/byte counts, seeded inputs, float64 reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import generator, randn

FAMILY = "gemm"


@dataclass(frozen=True)
class GemmProblem:
    M: int
    N: int
    K: int

    family = FAMILY

    def params(self) -> dict:
        return {"M": self.M, "N": self.N, "K": self.K}

    def call_kwargs(self) -> dict:
        """Keyword arguments of the API call (and of the reference) that are not tensors."""
        return {}

    def label(self) -> str:
        return f"M{self.M}-N{self.N}-K{self.K}"

    def flops(self) -> int:
        return 2 * self.M * self.N * self.K

    def bytes(self, dtype: torch.dtype) -> int:
        """Compulsory traffic: read A and B once, write C once."""
        es = torch.tensor([], dtype=dtype).element_size()
        return es * (self.M * self.K + self.K * self.N + self.M * self.N)

    def make_inputs(self, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
        g = generator(seed)
        # An offset on A makes every output depend on the column sums of B: an answer of zeros, or one
        # that drops a K-block, is far outside the tolerance.
        a = randn((self.M, self.K), g, offset=0.25)
        b = randn((self.K, self.N), g)
        return {"a": a.to(device=device, dtype=dtype), "b": b.to(device=device, dtype=dtype)}


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double()


def baseline(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch's own answer in the input dtype (for the tolerance rule)."""
    return a @ b
