"""gemm: C[M,N] = A[M,K] . B[K,N]. Problem spec, FLOP/byte counts, seeded inputs, float64 reference.

layout "nt" is the same product with B stored [N, K] (a model's weight, as every framework's linear layer
holds it; cuBLAS calls it NT): C = A . B^T, what `pk.linear(x, w)` computes. It is a variant of this
family rather than a family of its own: same FLOPs, same bytes, same result rows, and the reports keep it
beside the "nn" case of the same M, N, K (its label ends in "-nt")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import generator, randn

FAMILY = "gemm"
LAYOUTS = ("nn", "nt")


@dataclass(frozen=True)
class GemmProblem:
    M: int
    N: int
    K: int
    layout: str = "nn"  # "nn": b is [K, N]; "nt": b is [N, K] (pk.linear)

    family = FAMILY

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"argument 'layout' must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def params(self) -> dict:
        # "layout" only when it is not the default: records of plain GEMMs stay as they were.
        return {"M": self.M, "N": self.N, "K": self.K, **({"layout": self.layout} if self.layout != "nn" else {})}

    def call_kwargs(self) -> dict:
        """Keyword arguments of the API call (and of the reference) that are not tensors."""
        return {"layout": self.layout} if self.layout != "nn" else {}

    def label(self) -> str:
        return f"M{self.M}-N{self.N}-K{self.K}" + ("-nt" if self.layout == "nt" else "")

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
        b = randn((self.N, self.K) if self.layout == "nt" else (self.K, self.N), g)
        return {"a": a.to(device=device, dtype=dtype), "b": b.to(device=device, dtype=dtype)}


def reference(a: torch.Tensor, b: torch.Tensor, layout: str = "nn") -> torch.Tensor:
    bd = b.double()
    return a.double() @ (bd.t() if layout == "nt" else bd)


def baseline(a: torch.Tensor, b: torch.Tensor, layout: str = "nn") -> torch.Tensor:
    """torch's own answer in the input dtype (for the tolerance rule)."""
    return torch.nn.functional.linear(a, b) if layout == "nt" else a @ b
