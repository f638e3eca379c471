"""`pykernels tokens --check hf`: the token report's prediction against a serving stack nobody here wrote.

Builds Hugging Face transformers' LlamaForCausalLM with the model's shapes from a config (random weights,
nothing downloaded; attn_implementation="sdpa"), and in the same process, with the same thread count:
- measures TTFT: one forward of the prompt (batch 1, logits of the last token only, as generate() asks)
  plus the argmax;
- measures TPOT: one decode step of `batch` sequences against a pre-filled DynamicCache of context-1
  tokens (the step makes it `context`), plus the argmax. The cache is cropped back after each step
  (two slices per layer, inside the timed call: microseconds);
- predicts both with `pykernels tokens --measure --unfused` for the `torch` backend (separate q/k/v and
  gate/up linears, as transformers runs them; cold kernels; kernels + the rest of the step,
  the KV-cache append counted as transformers' DynamicCache does it: torch.cat), and instead of the
  dispatch row the stack's overhead: its step at minimal shapes (overhead_s);
- prints measured / predicted per row. Target (issue 17): TTFT within 10%, TPOT within 15%.

Both sides run in one process after measure.pin_allocator (glibc keeps freed memory for reuse): with
glibc's defaults the transformers step pays thousands of page faults per call, which a loop of one op
does not reproduce; the rows record the step's page faults per call.

transformers is the optional extra `hf` (`pip install -e ".[hf]"`); without it the check says so (exit 2).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..harness import timing
from ..kernels import dtype_of
from ..kernels._common import dtype_name
from .models import derive

TTFT_TARGET = 0.10
TPOT_TARGET = 0.15


def hf_reason() -> str | None:
    """None when transformers (with LlamaForCausalLM) imports, else why not."""
    try:
        import transformers  # noqa: F401
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install raising anything
        return (f"transformers is not importable ({type(e).__name__}: {e}); install the extra: "
                "pip install -e \".[hf]\"")
    return None


# ---------------------------------------------------------------------------------------------------
# the arithmetic (no transformers needed: tested with stub figures)


def ratio_row(*, model: str, layers: int, dtype: str, batch: int, prompt: int, context: int, threads: int,
              measured_ttft_s: float, predicted_ttft_s: float | None, measured_tpot_s: float,
              predicted_tpot_s: float | None) -> dict:
    """One row of the check: measured / predicted per phase and whether it is within the target."""

    def ratio(m, p):
        return None if not p else m / p

    rt, rp = ratio(measured_ttft_s, predicted_ttft_s), ratio(measured_tpot_s, predicted_tpot_s)
    return {
        "model": model, "layers": layers, "dtype": dtype, "batch": batch, "prompt": prompt, "context": context,
        "threads": threads,
        "measured_ttft_s": measured_ttft_s, "predicted_ttft_s": predicted_ttft_s, "ttft_ratio": rt,
        "measured_tpot_s": measured_tpot_s, "predicted_tpot_s": predicted_tpot_s, "tpot_ratio": rp,
        "ttft_ok": rt is not None and abs(rt - 1) <= TTFT_TARGET,
        "tpot_ok": rp is not None and abs(rp - 1) <= TPOT_TARGET,
    }


def to_markdown(rows: list[dict], command: str = "", note: str = "") -> str:
    lines = [
        "# Token metering checked against transformers' LlamaForCausalLM (torch backend)",
        "",
        *([f"`{command}`", ""] if command else []),
        *([note, ""] if note else []),
        (f"Ratio = measured ÷ predicted. Target: TTFT within {TTFT_TARGET:.0%}, TPOT within {TPOT_TARGET:.0%}. "
         "Predicted = the torch backend's kernels (timed cold) + the rest of the step (KV append as "
         "torch.cat) + the stack's overhead (its step at minimal shapes, nothing to compute). Headline: "
         "medians; beside it the same from the fastest calls (contention only adds time: the cross-check on "
         "a shared machine)."),
        "",
        ("| model | layers | dtype | batch | prompt | context | threads | TTFT ms measured | predicted | ratio "
         "| TPOT ms measured | predicted | ratio | ratios of minimums (TTFT / TPOT) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(x):
        return "–" if x is None else f"{x * 1e3:.4g}"

    def r(x, ok):
        return "–" if x is None else f"{x:.3f}" + ("" if ok else " ✗")

    def mr(x):
        return "–" if x is None else f"{x:.3f}"

    for w in rows:
        lines.append(
            f"| {w['model']} | {w['layers']} | {w['dtype']} | {w['batch']} | {w['prompt']} | {w['context']} | "
            f"{w['threads']} | {ms(w['measured_ttft_s'])} | {ms(w['predicted_ttft_s'])} | "
            f"{r(w['ttft_ratio'], w['ttft_ok'])} | {ms(w['measured_tpot_s'])} | {ms(w['predicted_tpot_s'])} | "
            f"{r(w['tpot_ratio'], w['tpot_ok'])} | {mr(w.get('ttft_ratio_of_minimums'))} / "
            f"{mr(w.get('tpot_ratio_of_minimums'))} |"
        )
    return "\n".join(lines) + "\n"


def fastest(doc: dict) -> dict:
    """A copy of a --measure document whose medians are the fastest samples: contention on a shared machine
    only adds time, so predicting from minimums and comparing with the stack's minimum is the cross-check
    least disturbed by other processes."""
    import copy

    d = copy.deepcopy(doc)
    for b in d["benchmarks"]:
        ex = b.get("extra_info") or {}
        if ex.get("min_s"):
            ex["median_s"] = ex["min_s"]
    for r in d["pykernels_tokens"].get("step_ops", []):
        if r.get("min_s"):
            r["median_s"] = r["min_s"]
    return d


def predict(workload, doc: dict, overhead: dict[str, float] | None = None) -> dict[str, dict]:
    """{dtype: {"prefill": s, "decode": s}} for the torch backend from a --measure document: kernels + the
    rest of the step with the KV append as torch.cat. `overhead` {phase: seconds per step}: the checked
    stack's own cost of a step with nothing to compute (overhead_s), counted instead of the dispatch rows."""
    from . import metering

    rows = [dict(r) for r in doc["pykernels_tokens"].get("step_ops", [])]
    if overhead:
        for r in rows:
            if r["name"] == "dispatch" and r["phase"] in overhead:
                r["median_s"] = overhead[r["phase"]] / r["count"]
    stacks = metering.compute(workload, metering.measurements_from(doc), rows, kv_append="cat")
    out: dict = {}
    for st in stacks:
        if st.backend == "torch":
            out[st.dtype] = {"prefill": st.prefill.with_rest_s, "decode": st.decode.with_rest_s}
    return out


# ---------------------------------------------------------------------------------------------------
# transformers


def build_hf(model, dtype: torch.dtype, max_positions: int):
    """LlamaForCausalLM with `model`'s shapes and random weights (from a config: nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=model.vocab, hidden_size=model.hidden, intermediate_size=model.ffn,
        num_hidden_layers=model.layers, num_attention_heads=model.heads, num_key_value_heads=model.kv_heads,
        head_dim=model.head_dim, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=model.tied_embeddings, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    try:
        m = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        m = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return m.eval()


def hf_callables(hf, workload, device: str = "cpu"):
    """(prefill, decode step) zero-argument callables on seeded token ids, cache pre-filled."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    V, P, L, B = workload.model.vocab, workload.prompt, workload.context, workload.batch
    prompt_ids = torch.randint(0, V, (1, P), generator=g).to(device)
    ctx_ids = torch.randint(0, V, (B, L - 1), generator=g).to(device)
    step_ids = torch.randint(0, V, (B, 1), generator=g).to(device)

    def prefill():
        with torch.inference_mode():
            out = hf(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].argmax(-1)

    # transformers >= 5.2x calls the cache argument `cache` (`past_key_values` is deprecated there)
    import inspect

    ckw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.inference_mode():
        cache = DynamicCache()
        hf(input_ids=ctx_ids, use_cache=True, logits_to_keep=1, **{ckw: cache})

    def decode():
        with torch.inference_mode():
            out = hf(input_ids=step_ids, use_cache=True, **{ckw: cache})
            tok = out.logits[:, -1].argmax(-1)
            cache.crop(-1)  # back to L - 1 cached tokens (a negative count: removed from the end)
            return tok

    return prefill, decode


def _page_faults(fn, calls: int = 3) -> float | None:
    """Page faults (minor + major) of this process per call of `fn` (0 when the allocator reuses memory)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None

    def n():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_minflt + ru.ru_majflt

    n0 = n()
    for _ in range(calls):
        fn()
    return (n() - n0) / calls


def minimal_model(model):
    """`model` with the smallest shapes that keep its code paths (layers, the query / KV head ratio): a step
    of it in transformers is nearly all overhead (op dispatch, Python, module calls, the cache's bookkeeping)."""
    from dataclasses import replace

    group = max(1, model.heads // model.kv_heads)
    return replace(model, hidden=64, heads=4 * group, kv_heads=4, head_dim=16, ffn=128, vocab=256)


def overhead_s(model, workload, dtype) -> dict[str, float]:
    """{phase: seconds}: transformers' prefill and decode step of the same architecture at minimal shapes
    (minimal_model; same layers and batch, prompt and context 16): the stack's cost of a step with nothing
    to compute: every op's dispatch and allocation, and the Python around them (module calls, the
    attention-interface choice, the cache's bookkeeping, positions and masks).

    It replaces the dispatch row (views of a small tensor x the ops that are neither kernels nor rows: 0.02
    ms per decode step of the tiny model), which missed most of it. On the Sapphire Rapids VM,
    transformers' decode step of the tiny model took 2.2 ms (bf16, batch 1 and 8) more than its kernels and
    rows timed one by one, and this overhead measured 1.8 / 2.1 ms; of it, replaying the same aten ops from
    a plain loop took 1.1 / 1.5 ms, the Python around them 0.6 ms. The kernels' and rows' own timings hold
    their ops' dispatch too (a few µs each, some ten per layer): counted twice, a little."""
    small = derive(minimal_model(model), prompt=min(16, workload.prompt), context=min(16, workload.context),
                   batch=workload.batch, fused=False)
    hf = build_hf(small.model, dtype, 40)
    prefill, decode = hf_callables(hf, small)
    opts = timing.TimingOptions(budget_s=1.0, min_rounds=100)
    return {"prefill": timing.time_cpu(prefill, opts).median_s, "decode": timing.time_cpu(decode, opts).median_s}


def run_check(args, workload) -> int:
    reason = hf_reason()
    if reason:
        print(f"pykernels tokens --check hf: unavailable: {reason}", file=sys.stderr)
        return 2
    from .measure import measure
    from .metering import _command_line

    # transformers' Llama runs q, k, v and gate, up as separate linears: predict those shapes
    workload = derive(workload.model, prompt=workload.prompt, context=workload.context, batch=workload.batch,
                      fused=False)
    dtypes = args.dtype or ["float32"]
    out_dir = Path(args.out) if args.out else None
    threads = torch.get_num_threads()
    rows = []
    opts = timing.TimingOptions(budget_s=max(args.budget, 1.0) * 3, min_rounds=5)
    for dt in dtypes:
        dtype = dtype_of(dt)
        stem = f"{workload.model.name}-L{workload.model.layers}-{dt}-b{workload.batch}"
        pred_file = (out_dir / f"predicted-{stem}.json" if out_dir
                     else Path(tempfile.gettempdir()) / f"pykernels-check-{os.getpid()}-{stem}.json")
        doc = measure(workload, backends=["torch"], dtypes=[dt], device="cpu", out=pred_file,
                      budget_s=args.budget, check=False, command=_command_line(), cold=not args.warm, step_ops=True)
        hf = build_hf(workload.model, dtype, max(workload.prompt, workload.context) + 8)
        prefill, decode = hf_callables(hf, workload)
        prefill()
        decode()
        over = overhead_s(workload.model, workload, dtype)
        pred = predict(workload, doc, over).get(dtype_name(dtype), {})
        pred_min = predict(workload, fastest(doc), over).get(dtype_name(dtype), {})
        st_pre = timing.time_cpu(prefill, opts)
        st_dec = timing.time_cpu(decode, opts)
        faults = {"prefill": _page_faults(prefill), "decode": _page_faults(decode)}
        row = ratio_row(model=workload.model.name, layers=workload.model.layers, dtype=dtype_name(dtype),
                        batch=workload.batch, prompt=workload.prompt, context=workload.context, threads=threads,
                        measured_ttft_s=st_pre.median_s, predicted_ttft_s=pred.get("prefill"),
                        measured_tpot_s=st_dec.median_s, predicted_tpot_s=pred.get("decode"))
        mins = ratio_row(model="", layers=0, dtype="", batch=0, prompt=0, context=0, threads=0,
                         measured_ttft_s=st_pre.min_s, predicted_ttft_s=pred_min.get("prefill"),
                         measured_tpot_s=st_dec.min_s, predicted_tpot_s=pred_min.get("decode"))
        row.update(overhead_s=over, ttft_cv=st_pre.cv, tpot_cv=st_dec.cv,
                   page_faults_per_call=faults,
                   allocator=doc["pykernels_tokens"].get("allocator"),
                   ttft_ratio_of_minimums=mins["ttft_ratio"], tpot_ratio_of_minimums=mins["tpot_ratio"])
        rows.append(row)
        print(f"  hf {dt} batch {workload.batch}: TTFT {st_pre.median_s * 1e3:.4g} ms (predicted "
              f"{(pred.get('prefill') or 0) * 1e3:.4g}), TPOT {st_dec.median_s * 1e3:.4g} ms (predicted "
              f"{(pred.get('decode') or 0) * 1e3:.4g})", flush=True)
        del hf, prefill, decode
    import transformers

    note = (f"transformers {transformers.__version__}, torch {torch.__version__}, {threads} thread"
            f"{'' if threads == 1 else 's'}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
            f"load average before/after {os.getloadavg()[0]:.1f}; allocator (both sides): "
            f"{rows[0]['allocator'] if rows else '?'}")
    md = to_markdown(rows, _command_line(), note)
    print(md)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"check-{workload.model.name}-L{workload.model.layers}-b{workload.batch}"
        (out_dir / f"{stem}.json").write_text(json.dumps({"rows": rows, "note": note,
                                                          "command": _command_line()}, indent=1) + "\n")
        (out_dir / f"{stem}.md").write_text(md)
    return 0 if all(r["ttft_ok"] and r["tpot_ok"] for r in rows) else 1
