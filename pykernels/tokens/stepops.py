"""The rest of a step: the torch ops between a decoder's kernels, timed on the model's shapes.

A Llama-shaped step runs, besides its GEMMs and attention: RMSNorm (2 per layer + 1 final), the rotary
embedding of q and k, SiLU(gate) * up, two residual adds per layer, in a prefill the copy of the attention
output from head-major back to token-major rows (the O projection's input), the KV-cache append, the
embedding lookup and the argmax over the vocabulary (greedy sampling); and in an eager framework each op,
view and reshape pays a dispatch cost of its own. `pykernels tokens --measure` times each of these as one row
(torch eager ops: what every backend of this suite runs between its kernels, see tokens/layer.py), and the
report shows them beside the kernels, so that the kernels' share of a step is visible.

Three KV-cache appends, since stacks differ here: "inplace" (a preallocated contiguous cache, the token
written at its position: vLLM, TGI, transformers' StaticCache), "paged" (written into its block's slot
through the block table), "cat" (transformers' default DynamicCache: torch.cat re-copies the whole
cache every step). The report counts one of them (--kv-append, default inplace).

Dispatch: the per-op cost of an eager op (a view of a small tensor: nothing but dispatch) times the number
of aten ops of an eager torch decoder layer (tokens/layer.py, counted with a TorchDispatchMode) that are
neither kernels nor rows of this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels._common import generator, randn
from . import layer as _layer

KV_APPENDS = ("inplace", "paged", "cat")
PAGE = 16  # block size of the paged cache append (vLLM's default)


@dataclass(frozen=True)
class StepOp:
    name: str  # rmsnorm, rotary, silu_mul, residual_add, head_transpose, kv_append_*, argmax, embedding, dispatch
    phase: str  # "prefill" or "decode"
    count: int  # calls per phase (layers included)
    shape: str  # what it runs on, for the table

    @property
    def key(self) -> tuple[str, str]:
        return (self.phase, self.name)


def step_ops(workload) -> list[StepOp]:
    """The rows of both phases for `workload` (models.Workload). Prefill: batch 1, P tokens; its cache
    is written by the prefill itself (no append row)."""
    m, n = workload.model, workload.model.layers
    out = []
    for phase, T in (("prefill", workload.prompt), ("decode", workload.batch)):
        out += [
            StepOp("embedding", phase, 1, f"[{T}] of [{m.vocab}, {m.hidden}]"),
            StepOp("rmsnorm", phase, 2 * n + 1, f"[{T}, {m.hidden}]"),
            StepOp("rotary", phase, n, f"q [{T}, {m.heads}, {m.head_dim}], k [{T}, {m.kv_heads}, {m.head_dim}]"),
            StepOp("silu_mul", phase, n, f"[{T}, {2 * m.ffn}] -> [{T}, {m.ffn}]"),
            StepOp("residual_add", phase, 2 * n, f"[{T}, {m.hidden}]"),
        ]
        if phase == "prefill":  # a decode step's attention output [B, Hq, D] is token-major already
            out.append(StepOp("head_transpose", phase, n, f"[1, {m.heads}, {T}, {m.head_dim}] -> "
                              f"[{T}, {m.heads * m.head_dim}]"))
        if phase == "decode":
            B, L = workload.batch, workload.context
            cache = f"K and V [{B}, {m.kv_heads}, {L}, {m.head_dim}]"
            out += [StepOp(f"kv_append_{a}", phase, n, cache) for a in KV_APPENDS]
        out += [
            StepOp("argmax", phase, 1, f"[{1 if phase == 'prefill' else T}, {m.vocab}]"),
            StepOp("dispatch", phase, n, "eager ops per layer that are neither kernels nor rows"),
        ]
    return out


def counted(op: StepOp, kv_append: str) -> bool:
    """Whether `op` enters the phase's total for this choice of cache append."""
    return not op.name.startswith("kv_append_") or op.name == f"kv_append_{kv_append}"


# ---------------------------------------------------------------------------------------------------
# the callables


def _rope_qk(q, k, cos, sin):
    return _layer._rope(q, cos, sin), _layer._rope(k, cos, sin)


def build(op: StepOp, workload, dtype: torch.dtype, device: str = "cpu", seed: int = 3,
          dispatch_ops: int | None = None):
    """A zero-argument callable running `op` once on fresh seeded tensors (all allocation done here).
    `dispatch_ops`: the op count of the dispatch row (default: dispatch_ops_per_layer(...)[0])."""
    m = workload.model
    T = workload.prompt if op.phase == "prefill" else workload.batch
    g = generator(seed)

    def t(*shape, offset=0.0):
        return randn(shape, g, offset=offset).to(device=device, dtype=dtype)

    # operands(fn, read, rest): `read` is what a decode step reads from memory, `rest` the activations; a
    # prefill's are all in memory (measure.cold_operands)
    pre = op.phase == "prefill"

    def operands(fn, read=(), rest=()):  # fn with its cold_operands
        return _cold(fn, *read, *(rest if pre else ()))

    if op.name == "embedding":
        table = t(m.vocab, m.hidden)
        ids = torch.randint(0, m.vocab, (T,), generator=g).to(device)
        return operands(lambda: F.embedding(ids, table), (table,), (ids,))
    if op.name == "rmsnorm":
        x, w = t(T, m.hidden), t(m.hidden, offset=1.0)
        return operands(lambda: _layer._rms_norm(x, w), (w,), (x,))
    if op.name == "rotary":
        q, k = t(T, m.heads, m.head_dim), t(T, m.kv_heads, m.head_dim)
        cos, sin = t(T, 1, m.head_dim), t(T, 1, m.head_dim)
        return operands(lambda: _rope_qk(q, k, cos, sin), (), (q, k, cos, sin))
    if op.name == "silu_mul":
        gu, f = t(T, 2 * m.ffn), m.ffn
        return operands(lambda: F.silu(gu[:, :f]) * gu[:, f:], (), (gu,))
    if op.name == "residual_add":
        x, y = t(T, m.hidden), t(T, m.hidden)
        return operands(lambda: x + y, (), (x, y))
    if op.name == "head_transpose":  # the attention output back to token-major rows for the O projection
        a, H, D = t(1, m.heads, T, m.head_dim), m.heads, m.head_dim
        return operands(lambda: a[0].transpose(0, 1).reshape(T, H * D), (), (a,))
    if op.name == "argmax":
        logits = t(1 if op.phase == "prefill" else T, m.vocab)
        return operands(lambda: logits.argmax(-1), (), (logits,))
    if op.name.startswith("kv_append_"):
        return _kv_append(op.name[len("kv_append_"):], workload, t, device)
    if op.name == "dispatch":
        x = t(4, 4)
        n = dispatch_ops_per_layer(workload, dtype, device)[0] if dispatch_ops is None else dispatch_ops
        if n == 0:
            return lambda: None

        def run():  # n views of a small tensor: nothing but the eager dispatch of n ops
            for _ in range(n):
                x.view(16)

        return run
    raise ValueError(f"unknown step op {op.name!r}")


def _cold(fn, *tensors):
    """fn with `cold_operands`: what a step reads from memory (decode: a weight, the KV cache; prefill: every
    operand), evicted before each call when metering cold (tokens/measure.py); the rest (a decode step's
    activations, just written) stays cached."""
    fn.cold_operands = tensors
    return fn


def _kv_append(kind: str, workload, t, device):
    m, B, L = workload.model, workload.batch, workload.context
    Hkv, D = m.kv_heads, m.head_dim
    k, v = t(B, Hkv, D), t(B, Hkv, D)
    pos = L - 1
    if kind == "inplace":
        kc, vc = t(B, Hkv, L, D), t(B, Hkv, L, D)

        def run():
            kc[:, :, pos] = k
            vc[:, :, pos] = v

        run.tensors = {"k_cache": kc, "v_cache": vc, "k": k, "v": v}  # for the tests
        return _cold(run, kc, vc)
    if kind == "paged":
        per_seq = -(-L // PAGE)
        kc, vc = t(B * per_seq, Hkv, PAGE, D), t(B * per_seq, Hkv, PAGE, D)
        block = (torch.arange(B) * per_seq + pos // PAGE).to(device)  # block_table[b, pos // PAGE]
        slot = pos % PAGE

        def run():
            kc[block, :, slot] = k
            vc[block, :, slot] = v

        run.tensors = {"k_cache": kc, "v_cache": vc, "k": k, "v": v, "block": block, "slot": slot}
        return _cold(run, kc, vc)
    if kind == "cat":  # the cache grows by one position: the L-1 cached ones are copied into a new tensor
        kc, vc = t(B, Hkv, L - 1, D), t(B, Hkv, L - 1, D)
        k4, v4 = k[:, :, None], v[:, :, None]
        return _cold(lambda: (torch.cat((kc, k4), dim=2), torch.cat((vc, v4), dim=2)), kc, vc)
    raise ValueError(f"argument 'kv_append' must be one of {', '.join(KV_APPENDS)}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------
# counting eager ops


class _OpCounter:
    """Counts aten ops dispatched while active (torch.utils._python_dispatch.TorchDispatchMode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.n += 1
                return func(*args, **(kwargs or {}))

        self.n = 0
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def count_ops(fn) -> int:
    """Number of aten ops one call of `fn` dispatches."""
    with _OpCounter() as c:
        fn()
    return c.n


def dispatch_ops_per_layer(workload, dtype: torch.dtype, device: str = "cpu") -> tuple[int, int]:
    """(extra, total): aten ops of one eager torch decode-step layer (tokens/layer.py, backend torch) that
    are neither its kernels nor rows of this table (views, reshapes, splits, copies: each costs one
    dispatch), and all its aten ops."""
    small = workload.model
    lay = _layer.DecoderLayer(small, "torch", dtype, device, max_positions=workload.context)
    x, kc, vc, lens = lay.decode_inputs(workload.batch, workload.context)
    total = count_ops(lambda: lay.decode_step(x, kc, vc, lens))
    calls = lay.record(lambda: lay.decode_step(x, kc, vc, lens))
    from .. import ops

    kernels = sum(count_ops(ops.prepare(fam, backend=lay.backend, **inp)) for _, fam, inp in calls)
    per_layer_rows = {"rmsnorm": 2, "rotary": 1, "silu_mul": 1, "residual_add": 2, "kv_append_inplace": 1}
    rows = 0
    for name, times in per_layer_rows.items():
        rows += times * count_ops(build(StepOp(name, "decode", 1, ""), workload, dtype, device, dispatch_ops=0))
    return max(0, total - kernels - rows), total
