"""What every family shares: supported dtypes, seeded generation, the error metric and the tolerance rule.

The tolerance rule (STYLE.md 3): a backend's error against the float64 reference may be at most about
twice torch's own error at that dtype (``baseline``, computed by each family with plain torch math in
the input dtype), plus a small floor per dtype.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Floors of the tolerance rule, relative to max|reference|. bf16 has 8 significant bits (half an ulp is
# 2**-9 ~ 2e-3 relative), fp16 11, fp32 24; the floors are about one output rounding step at each.
FLOOR: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
# Factor on torch's own error.
BASELINE_FACTOR = 2.0


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """Accept 'bfloat16', 'bf16', torch.bfloat16, ...; raise ValueError on anything else."""
    if isinstance(name, torch.dtype):
        if name in DTYPE_NAMES:
            return name
        raise ValueError(f"dtype {name} is not supported (supported: {', '.join(DTYPES)})")
    aliases = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
               "bf16": "bfloat16", "float": "float32"}
    key = aliases.get(str(name), str(name))
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, gen: torch.Generator, *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """float32 normal values on the CPU (moved and cast by the caller): the same seed gives the same
    inputs on every device."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale + offset


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed in float64; NaN anywhere in out gives inf."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} does not match the reference {tuple(ref.shape)}")
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    denom = ref.abs().max().item()
    return (o - ref).abs().max().item() / max(denom, 1e-30)


def tolerance(dtype: torch.dtype, baseline_error: float) -> float:
    return BASELINE_FACTOR * baseline_error + FLOOR[dtype]
