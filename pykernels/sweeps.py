"""The shape sweeps of the benchmarks (bench/): named lists of (problem, dtype) per family.

- `smoke`: tiny shapes, run once untimed by plain `pytest` so bench/ never rots (odd sizes included).
- `issue6`: the exact cases of issue 6 (native CPU kernels vs the vendor libraries).
- `quick`: the `issue6` cases (they include decode-sized GEMMs, M = 1, 4, 16); the default of
  `pytest --benchmark`.
- `full`: `quick` plus the shapes of the reference model ref-7b-2k (DESIGN.md): a batch-1 prefill of 2048
  tokens and decode steps at context 2048 for B in {1, 8, 32}, and a GQA decode.

They live in the package (not in bench/) so that the pytest plugin, `pykernels info` and other tools see
the same lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernels import AttentionProblem, DecodeProblem, GemmProblem

FP32, BF16 = "float32", "bfloat16"


@dataclass(frozen=True)
class SweepCase:
    problem: object
    dtype: str

    @property
    def family(self) -> str:
        return self.problem.family

    def id(self) -> str:
        return f"{self.dtype}-{self.problem.label()}"


def _cases(problems, dtypes) -> list[SweepCase]:
    return [SweepCase(p, dt) for dt in dtypes for p in problems]


def _smoke() -> list[SweepCase]:
    gemm = [GemmProblem(M=1, N=65, K=63), GemmProblem(M=33, N=64, K=127)]
    attn = [AttentionProblem(B=1, Hq=2, Hkv=1, S=65, D=64, causal=True),
            AttentionProblem(B=1, Hq=2, Hkv=2, S=33, D=128, causal=False)]
    dec = [DecodeProblem(B=2, Hq=4, Hkv=2, context=65, D=64),
           DecodeProblem(B=3, Hq=4, Hkv=1, context=100, D=128, paged=True, block_size=16, ragged=True)]
    return _cases(gemm + attn + dec, (FP32, BF16))


def _issue6() -> list[SweepCase]:
    out = []
    out += _cases([GemmProblem(2048, 2048, 2048), GemmProblem(1024, 1024, 1024)], (FP32,))
    out += _cases([GemmProblem(2048, 2048, 2048)], (BF16,))
    out += _cases([GemmProblem(M=m, N=4096, K=4096) for m in (1, 4, 16)], (FP32, BF16))
    out += _cases([AttentionProblem(B=1, Hq=16, Hkv=16, S=2048, D=128, causal=c) for c in (False, True)],
                  (FP32, BF16))
    out += _cases([DecodeProblem(B=8, Hq=32, Hkv=hkv, context=4096, D=128, paged=paged, block_size=16)
                   for hkv in (8, 32) for paged in (False, True)], (FP32, BF16))
    return out


# ref-7b-2k (DESIGN.md): hidden 4096, 32 heads x 128, FFN 11008, vocab 32000, context 2048.
REF_HIDDEN, REF_HEADS, REF_D, REF_FFN, REF_VOCAB, REF_CTX = 4096, 32, 128, 11008, 32000, 2048
REF_GEMM_NK = {  # role: (K, N) of the weight
    "qkv": (REF_HIDDEN, 3 * REF_HIDDEN),
    "o_proj": (REF_HIDDEN, REF_HIDDEN),
    "gate_up": (REF_HIDDEN, 2 * REF_FFN),
    "down": (REF_FFN, REF_HIDDEN),
    "lm_head": (REF_HIDDEN, REF_VOCAB),
}
DECODE_BATCHES = (1, 8, 32)


def ref_model_problems() -> list:
    """Every kernel shape ref-7b-2k runs: the prefill of 2048 tokens (B=1) and decode steps at context
    2048 for B in {1, 8, 32} (GEMMs with M = B)."""
    probs = [GemmProblem(M=REF_CTX, N=n, K=k) for k, n in REF_GEMM_NK.values()]
    probs.append(AttentionProblem(B=1, Hq=REF_HEADS, Hkv=REF_HEADS, S=REF_CTX, D=REF_D, causal=True))
    for b in DECODE_BATCHES:
        probs += [GemmProblem(M=b, N=n, K=k) for k, n in REF_GEMM_NK.values()]
        probs.append(DecodeProblem(B=b, Hq=REF_HEADS, Hkv=REF_HEADS, context=REF_CTX, D=REF_D))
    return probs


def _quick() -> list[SweepCase]:
    return _issue6()


def _full() -> list[SweepCase]:
    seen = set()
    out = []
    extra = _cases(ref_model_problems(), (FP32, BF16))
    extra += _cases([DecodeProblem(B=8, Hq=32, Hkv=8, context=REF_CTX, D=128, paged=True, block_size=16,
                                   ragged=True)], (FP32, BF16))
    for c in _quick() + extra:
        if (c.problem, c.dtype) not in seen:
            seen.add((c.problem, c.dtype))
            out.append(c)
    return out


SWEEPS = {"smoke": _smoke, "issue6": _issue6, "quick": _quick, "full": _full}


def model_sweep_name(model: str, *, prompt: int | None = None, context: int | None = None, batch: int = 1) -> str:
    """The sweep name of a model's shapes: `model:NAME:PROMPT:CONTEXT:BATCH` (empty = the model's default)."""
    return f"model:{model}:{prompt or ''}:{context or ''}:{batch}"


def _model(name: str) -> list[SweepCase]:
    from .models import model_problems

    parts = name.split(":")
    if len(parts) != 5:
        raise ValueError(f"malformed model sweep {name!r}; expected model:NAME:PROMPT:CONTEXT:BATCH")
    _, model, prompt, context, batch = parts
    probs = model_problems(model, prompt=int(prompt) if prompt else None,
                           context=int(context) if context else None, batch=int(batch))
    return _cases(probs, (FP32, BF16))


def sweep(name: str, *, family: str | None = None, dtypes=None) -> list[SweepCase]:
    """The cases of sweep `name` (or of a model, see `model_sweep_name`), optionally only one family and
    some dtypes."""
    if name.startswith("model:"):
        cases = _model(name)
    elif name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; known: {', '.join(SWEEPS)}")
    else:
        cases = SWEEPS[name]()
    if family is not None:
        cases = [c for c in cases if c.family == family]
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes]
    return cases
