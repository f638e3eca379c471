"""The shape sweeps of the benchmarks (bench/): named lists of (problem, dtype) per family.

- `smoke`: tiny shapes, run once untimed by plain `pytest` so bench/ never rots (odd sizes included).
- `quick`: the native-vs-vendor target cases: GEMM 2048^3 / 1024^3 and decode-sized GEMMs (M = 1, 4, 16,
  N = K = 4096), prefill attention S2048 D128 (causal and not), decode B8 Hq32 L4096 D128 (Hkv 8 and 32,
  contiguous and paged); the default of `pykernels bench`.
- `small`: the fixed-cost shapes (issue 21): GEMM 16^3-128^3, attention B1 H16 S16-128 D64, decode B1 Hq32 Hkv8
  D128 contexts 16-128 (a model's decode step at batch 1 is made of such calls); fp32 and bf16. A case takes
  microseconds, so the whole sweep is a few seconds of timing per backend. Its fp32 cases are part of `quick`.
- `full`: `quick` plus the shapes of the reference model ref-7b-2k (docs/design.md): a batch-1 prefill of 2048
  tokens and decode steps at context 2048 for B in {1, 8, 32}, and a GQA decode.

Besides the named sweeps: a model's shapes (`model_sweep_name`) and shapes given on the command line
(`--shape "M=4096,N=4096,K=4096"`, `shapes_sweep_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import AttentionProblem, DecodeProblem, GemmProblem

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


def _small() -> list[SweepCase]:
    sizes = (16, 32, 64, 128)
    gemm = [GemmProblem(n, n, n) for n in sizes]
    attn = [AttentionProblem(B=1, Hq=16, Hkv=16, S=s, D=64) for s in sizes]
    dec = [DecodeProblem(B=1, Hq=32, Hkv=8, context=c, D=128) for c in sizes]
    return _cases(gemm + attn + dec, (FP32, BF16))


def _quick() -> list[SweepCase]:
    out = []
    out += _cases([GemmProblem(2048, 2048, 2048), GemmProblem(1024, 1024, 1024)], (FP32,))
    out += _cases([GemmProblem(2048, 2048, 2048)], (BF16,))
    out += _cases([GemmProblem(M=m, N=4096, K=4096) for m in (1, 4, 16)], (FP32, BF16))
    out += _cases([AttentionProblem(B=1, Hq=16, Hkv=16, S=2048, D=128, causal=c) for c in (False, True)],
                  (FP32, BF16))
    out += _cases([DecodeProblem(B=8, Hq=32, Hkv=hkv, context=4096, D=128, paged=paged, block_size=16)
                   for hkv in (8, 32) for paged in (False, True)], (FP32, BF16))
    out += [c for c in _small() if c.dtype == FP32]  # each shape costs torch_compile a compile: fp32 only here
    return out


# ref-7b-2k (docs/design.md): hidden 4096, 32 heads x 128, FFN 11008, vocab 32000, context 2048.
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


SWEEPS = {"smoke": _smoke, "small": _small, "quick": _quick, "full": _full}


def model_sweep_name(model: str, *, prompt: int | None = None, context: int | None = None, batch: int = 1) -> str:
    """The sweep name of a model's shapes: `model:NAME:PROMPT:CONTEXT:BATCH` (empty = the model's default)."""
    return f"model:{model}:{prompt or ''}:{context or ''}:{batch}"


def _model(name: str) -> list[SweepCase]:
    from ..tokens.models import model_problems

    parts = name.split(":")
    if len(parts) != 5:
        raise ValueError(f"malformed model sweep {name!r}; expected model:NAME:PROMPT:CONTEXT:BATCH")
    _, model, prompt, context, batch = parts
    probs = model_problems(model, prompt=int(prompt) if prompt else None,
                           context=int(context) if context else None, batch=int(batch))
    return _cases(probs, (FP32, BF16))


# --shape: the keys of each family (the first key set that a spec's keys fall into decides the family).
_SHAPE_KEYS = {
    "gemm": ({"M", "N", "K"}, {"layout"}),
    "attention": ({"B", "Hq", "Hkv", "S", "D"}, {"causal"}),
    "decode": ({"B", "Hq", "Hkv", "L", "D"}, {"paged", "block_size", "ragged"}),
}
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_shape(spec: str):
    """A problem from `KEY=VALUE,...`: `M=4096,N=4096,K=4096[,layout=nt]` (gemm; nt: pk.linear, B stored [N, K]),
    `B=1,Hq=32,Hkv=8,S=2048,D=128[,causal=1]`
    (attention), `B=8,Hq=32,Hkv=8,L=4096,D=128[,paged=1,block_size=16,ragged=0]` (decode). Raises ValueError
    naming what is wrong."""
    kv = {}
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not val:
            raise ValueError(f"shape {spec!r}: {part!r} is not KEY=VALUE")
        if key in kv:
            raise ValueError(f"shape {spec!r}: {key} given twice")
        kv[key] = val
    for family, (required, optional) in _SHAPE_KEYS.items():
        if required <= kv.keys():
            unknown = kv.keys() - required - optional
            if unknown:
                raise ValueError(f"shape {spec!r}: unknown key(s) {', '.join(sorted(unknown))} for a {family} shape "
                                 f"(keys: {', '.join(sorted(required))}; optional: {', '.join(sorted(optional)) or '-'})")
            args = {}
            for key, val in kv.items():
                if key == "layout":  # checked by GemmProblem
                    args[key] = val
                    continue
                if key in ("causal", "paged", "ragged"):
                    if val.lower() not in _BOOL:
                        raise ValueError(f"shape {spec!r}: {key}={val} is not a boolean (1/0, true/false)")
                    args[key] = _BOOL[val.lower()]
                    continue
                try:
                    n = int(val)
                except ValueError:
                    raise ValueError(f"shape {spec!r}: {key}={val} is not an integer") from None
                if n < 1:
                    raise ValueError(f"shape {spec!r}: {key}={n} must be >= 1")
                args[key] = n
            if family in ("attention", "decode") and args["Hq"] % args["Hkv"]:
                raise ValueError(f"shape {spec!r}: Hq={args['Hq']} is not a multiple of Hkv={args['Hkv']}")
            if family == "gemm":
                try:
                    return GemmProblem(**args)
                except ValueError as e:  # the layout
                    raise ValueError(f"shape {spec!r}: {e}") from None
            if family == "attention":
                return AttentionProblem(**args)
            args["context"] = args.pop("L")
            return DecodeProblem(**args)
    raise ValueError(f"shape {spec!r}: the keys {', '.join(sorted(kv)) or '(none)'} name no family; give "
                     + "; ".join(f"{f}: {','.join(sorted(r))}" for f, (r, _) in _SHAPE_KEYS.items()))


def shapes_sweep_name(specs) -> str:
    """The sweep name of shapes given on the command line (checked now: ValueError on a bad spec)."""
    for s in specs:
        parse_shape(s)
    return "shapes:" + ";".join(s.replace(" ", "") for s in specs)


def sweep(name: str, *, family: str | None = None, dtypes=None) -> list[SweepCase]:
    """The cases of sweep `name` (or of a model, see `model_sweep_name`), optionally only one family and
    some dtypes."""
    if name.startswith("model:"):
        cases = _model(name)
    elif name.startswith("shapes:"):
        cases = _cases([parse_shape(s) for s in name[len("shapes:"):].split(";")], (FP32, BF16))
    elif name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; known: {', '.join(SWEEPS)}")
    else:
        cases = SWEEPS[name]()
    if family is not None:
        cases = [c for c in cases if c.family == family]
    if dtypes:
        cases = [c for c in cases if c.dtype in dtypes]
    return cases
