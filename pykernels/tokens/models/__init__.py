"""Reference decoder models as data, and the exact kernel problems one prefill and one decode step run.

A model is a small JSON file (the built-in ones sit beside this module; users pass their own path).
From a model, `derive()` lists the kernel problems of one prefill of P tokens (batch 1) and of one
decode step at context L and batch B, with how many times each runs. Like the problem specs in
pykernels/kernels/, nothing here times anything: the token report (pykernels/tokens/metering.py) and the sweep
look these problems up in measured results.

Every projection is a linear layer: a GEMM with the weight stored [N, K] (GemmProblem layout "nt",
pk.linear). The decoder is Llama-shaped: per layer RMSNorm -> fused QKV projection -> rotary embedding -> causal
attention (decode attention against the KV cache in a decode step) -> output projection -> residual ->
RMSNorm -> fused gate+up projection -> SwiGLU -> down projection -> residual; then a final RMSNorm and
the LM head. Norms, rotary embedding, the activation, residual adds, the KV-cache append, the embedding
lookup and the argmax are not kernels of this suite: pykernels/tokens/stepops.py times them as rows of
their own, and pykernels/tokens/layer.py measures how much of a layer's time the kernels cover.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ...kernels import AttentionProblem, DecodeProblem, GemmProblem

# field -> (type, required); the order is the order of the error messages and of to_dict().
_FIELDS = {
    "name": (str, True),
    "layers": (int, True),
    "hidden": (int, True),
    "heads": (int, True),
    "kv_heads": (int, False),  # default: heads (MHA)
    "head_dim": (int, False),  # default: hidden // heads
    "ffn": (int, True),
    "vocab": (int, True),
    "context": (int, True),
    "tied_embeddings": (bool, False),  # default: false (separate LM head); only changes the parameter count
    "description": (str, False),
}


class ModelError(ValueError):
    """A model file or name that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    tied_embeddings: bool = False
    description: str = ""
    source: str = field(default="", compare=False)

    # -- parameter counts ---------------------------------------------------------------------------
    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def layer_matmul_parameters(self) -> int:
        """Weights of one layer's projections: QKV, O, gate+up, down."""
        h, d = self.hidden, self.head_dim
        return h * self.qkv_width + self.heads * d * h + h * 2 * self.ffn + self.ffn * h

    def lm_head_parameters(self) -> int:
        return self.hidden * self.vocab

    def parameters(self) -> int:
        """All parameters: layers (projections + 2 RMSNorm weights), embedding, final norm, LM head
        (shared with the embedding when tied). Llama-2-7B: 6,738,415,616; Llama-3-8B: 8,030,261,248."""
        per_layer = self.layer_matmul_parameters() + 2 * self.hidden
        emb = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.lm_head_parameters()
        return self.layers * per_layer + emb + self.hidden + head

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _FIELDS}


def _check(raw: dict, where: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: a model must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ModelError(f"{where}: unknown field {unknown[0]!r} (known fields: {', '.join(_FIELDS)})")
    vals = {}
    for name, (typ, required) in _FIELDS.items():
        if name not in raw:
            if required:
                raise ModelError(f"{where}: missing field {name!r}")
            continue
        v = raw[name]
        # bool is an int in Python: a layer count of `true` is an error, not 1.
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ModelError(f"{where}: field {name!r} must be {typ.__name__}, got {v!r}")
        if typ is int and v < 1:
            raise ModelError(f"{where}: field {name!r} must be >= 1, got {v}")
        vals[name] = v
    vals.setdefault("kv_heads", vals["heads"])
    if "head_dim" not in vals:
        if vals["hidden"] % vals["heads"]:
            raise ModelError(
                f"{where}: field 'head_dim' is missing and hidden ({vals['hidden']}) is not a multiple "
                f"of heads ({vals['heads']})"
            )
        vals["head_dim"] = vals["hidden"] // vals["heads"]
    if vals["heads"] % vals["kv_heads"]:
        raise ModelError(
            f"{where}: field 'kv_heads' ({vals['kv_heads']}) must divide heads ({vals['heads']})"
        )
    if not vals["name"].strip():
        raise ModelError(f"{where}: field 'name' is empty")
    return ModelConfig(**vals, source=where)


def from_dict(raw: dict, where: str = "<dict>") -> ModelConfig:
    return _check(raw, where)


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load(name_or_path: str | Path) -> ModelConfig:
    """A built-in model by name ('ref-7b-2k', 'ref-8b-gqa', 'tiny') or a JSON file by path."""
    s = str(name_or_path)
    p = Path(s)
    if s.endswith(".json") or p.exists():
        if not p.is_file():
            raise ModelError(f"model file {s} does not exist")
        text, where = p.read_text(), s
    else:
        res = resources.files(__name__) / f"{s}.json"
        if not res.is_file():
            raise ModelError(
                f"unknown model {s!r}: built-in models are {', '.join(builtin_names())}; "
                "or pass the path of a .json model file"
            )
        text, where = res.read_text(), f"{s}.json (built-in)"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{where}: not valid JSON: {e}") from None
    return _check(raw, where)


# ---------------------------------------------------------------------------------------------------
# the kernel problems of one prefill and one decode step


@dataclass(frozen=True)
class KernelCall:
    """One kernel of the model: `count` calls of `problem` per phase (already multiplied by layers)."""

    role: str  # qkv, attention, o, gate_up, down, lm_head, decode
    problem: object  # GemmProblem | AttentionProblem | DecodeProblem
    count: int

    @property
    def family(self) -> str:
        return self.problem.family


@dataclass(frozen=True)
class Phase:
    name: str  # "prefill" or "decode"
    tokens: int  # tokens this phase produces or consumes: P for prefill, B for a decode step
    calls: tuple[KernelCall, ...]

    def flops(self) -> int:
        return sum(c.count * c.problem.flops() for c in self.calls)


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    prompt: int
    context: int
    batch: int
    prefill: Phase
    decode: Phase
    fused: bool = True  # fused QKV and gate+up projections (False: separate, as transformers' Llama)

    @property
    def phases(self) -> tuple[Phase, Phase]:
        return (self.prefill, self.decode)

    def problems(self) -> list:
        """The distinct kernel problems of both phases, in first-use order: what a sweep must time."""
        seen = {}
        for ph in self.phases:
            for c in ph.calls:
                seen.setdefault(c.problem, None)
        return list(seen)


def _linear(M: int, N: int, K: int) -> GemmProblem:
    # Weights as a model holds them, [N, K] (pk.linear): what every framework's linear layer runs.
    return GemmProblem(M, N, K, layout="nt")


def _layer_gemms(m: ModelConfig, rows: int, fused: bool = True) -> list[tuple[str, GemmProblem]]:
    h = m.hidden
    if not fused:  # q, k, v and gate, up as separate linears: what transformers' LlamaForCausalLM runs
        return [
            ("q", _linear(rows, m.heads * m.head_dim, h)),
            ("k", _linear(rows, m.kv_heads * m.head_dim, h)),
            ("v", _linear(rows, m.kv_heads * m.head_dim, h)),
            ("o", _linear(rows, h, m.heads * m.head_dim)),
            ("gate", _linear(rows, m.ffn, h)),
            ("up", _linear(rows, m.ffn, h)),
            ("down", _linear(rows, h, m.ffn)),
        ]
    return [
        ("qkv", _linear(rows, m.qkv_width, h)),
        ("o", _linear(rows, h, m.heads * m.head_dim)),
        ("gate_up", _linear(rows, 2 * m.ffn, h)),
        ("down", _linear(rows, h, m.ffn)),
    ]


def derive(
    model: ModelConfig | str, *, prompt: int | None = None, context: int | None = None, batch: int = 1,
    fused: bool = True,
) -> Workload:
    """Kernel problems and counts of one prefill of `prompt` tokens (batch 1; default: the model's
    context) and one decode step of `batch` sequences that each attend to `context` cached tokens
    (default: the model's context). The LM head runs for the last prompt token only in the prefill,
    for every sequence in the decode step. fused=False: q/k/v and gate/up as separate linears."""
    m = load(model) if isinstance(model, (str, Path)) else model
    P = m.context if prompt is None else prompt
    L = m.context if context is None else context
    for n, v in (("prompt", P), ("context", L), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"argument '{n}' must be a positive int, got {v!r}")
    n = m.layers
    pre = [(r, p) for r, p in _layer_gemms(m, P, fused)]
    pre.insert(1, ("attention", AttentionProblem(1, m.heads, m.kv_heads, P, m.head_dim, causal=True)))
    prefill = tuple(KernelCall(r, p, n) for r, p in pre) + (
        KernelCall("lm_head", _linear(1, m.vocab, m.hidden), 1),
    )
    dec = [(r, p) for r, p in _layer_gemms(m, batch, fused)]
    dec.insert(1, ("decode", DecodeProblem(batch, m.heads, m.kv_heads, L, m.head_dim)))
    decode = tuple(KernelCall(r, p, n) for r, p in dec) + (
        KernelCall("lm_head", _linear(batch, m.vocab, m.hidden), 1),
    )
    return Workload(m, P, L, batch, Phase("prefill", P, prefill), Phase("decode", batch, decode), fused)


def model_problems(
    model: ModelConfig | str, *, prompt: int | None = None, context: int | None = None, batch: int = 1
) -> list:
    """The distinct problems a sweep must run for `model` (what `pytest --benchmark --model NAME` needs)."""
    return derive(model, prompt=prompt, context=context, batch=batch).problems()


__all__ = [
    "KernelCall",
    "ModelConfig",
    "ModelError",
    "Phase",
    "Workload",
    "builtin_names",
    "derive",
    "from_dict",
    "load",
    "model_problems",
]
