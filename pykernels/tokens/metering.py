"""Token metering: kernel results -> TTFT, TPOT, tokens/s, share of time per family, penalty in tokens/s,
joules and cost per token, for a reference model (pykernels/tokens/models/).

TTFT = sum over the prefill's kernels of count x median time; TPOT likewise over one decode step;
tokens/s = batch / TPOT. Only measured kernel times enter: a backend (on a device, at a dtype) that lacks
a kernel of a phase is "incomplete" for that phase and never filled from another backend. The small ops
between kernels (norms, rotary embedding, activation, residuals) are not metered; pykernels/tokens/layer.py
measures what share of a real layer's time the kernels cover.

    pykernels tokens RESULTS.json... --model ref-7b-2k [--batch B] [--prompt P] [--context L]
                     [--price-per-hour X] [--csv out.csv] [--md out.md]
    pykernels tokens --measure --model tiny --backend native --backend torch --out results/x.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..kernels import PROBLEMS
from ..tables import Progress, fmt_speedup, isatty, markdown, table
from . import models as _models

_STDOUT = Path("-")  # `--md` without a file: print the Markdown

# ---------------------------------------------------------------------------------------------------
# reading results


@dataclass(frozen=True)
class Measurement:
    """One kernel result, normalised from a result file."""

    device: str
    backend: str
    tier: str
    dtype: str
    problem: object
    median_s: float
    spread: float = 0.0  # relative noise of the median: (p80 - p20) / (2 median), else cv
    power_w: float | None = None  # average power while it was timed
    energy_j: float | None = None  # energy per call, where measured directly
    power_note: str = ""  # the meter, or why there is no power figure


_SHAPE_KEYS = {f: {x.name for x in fields(cls)} for f, cls in PROBLEMS.items()}


def _problem_from(family: str, params: dict):
    keys = _SHAPE_KEYS[family]
    kw = {k: v for k, v in params.items() if k in keys and v is not None}
    try:
        return PROBLEMS[family](**kw)
    except TypeError:  # a record without the full shape cannot be matched to a model's problem
        return None


def _first(d: dict, *names):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return None


def _device_label(ex: dict, machine: dict) -> str:
    """'cpu (AMD EPYC ...)' / 'cuda (NVIDIA H100 ...)': the device type plus the most specific name known."""
    if ex.get("device_name"):  # the harness's label, e.g. "cpu: AMD EPYC (2 threads)" (device.device_label)
        return str(ex["device_name"])
    name = None
    dev = machine.get("device") if isinstance(machine.get("device"), dict) else {}
    name = name or _first(dev, "name", "model")
    kind = str(_first(ex, "device") or dev.get("type") or "cpu").split(":")[0]
    if not name and kind == "cpu":
        name = (machine.get("cpu") or {}).get("brand_raw")
    return f"{kind} ({name})" if name else kind


def measurements_from(doc: dict, where: str = "<results>") -> list[Measurement]:
    """Measurements of one pytest-benchmark JSON document (our fields in `extra_info`)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise ValueError(f"{where}: not a pytest-benchmark result file (no 'benchmarks' list)")  # noqa: TRY004 - a file's content, reported as a usage error
    machine = doc.get("machine_info") or {}
    out = []
    for b in doc["benchmarks"]:
        ex = b.get("extra_info") or {}
        fam = ex.get("family")
        if fam not in PROBLEMS or ex.get("error") or ex.get("ok") is False:
            continue  # another kind of benchmark, or a failed case: it does not rank
        params = {**(b.get("params") or {}), **(ex.get("params") or {}), **ex}
        prob = _problem_from(fam, params)
        stats = b.get("stats") or {}
        med = _first(ex, "median_s", "median", "time_s")
        med = med if med is not None else stats.get("median")
        if prob is None or not med or med <= 0:
            continue
        p20, p80 = _first(ex, "p20_s", "p20"), _first(ex, "p80_s", "p80")
        if p20 is not None and p80 is not None:
            spread = (p80 - p20) / (2 * med)
        else:
            spread = float(_first(ex, "cv") or 0.0)
        out.append(
            Measurement(
                device=_device_label(ex, machine),
                backend=str(ex.get("backend", "?")),
                tier=str(ex.get("tier", "?")),
                dtype=str(ex.get("dtype", "?")).replace("torch.", ""),
                problem=prob,
                median_s=float(med),
                spread=abs(spread),
                power_w=ex.get("power_w"),
                energy_j=ex.get("energy_j_per_call"),
                power_note=str(
                    ex.get("power_source") or ex.get("power_reason") or "no power figure in the results"
                ),
            )
        )
    return out


def recorded(paths) -> list[tuple[str, dict]]:
    """(path, the `pykernels_tokens` section) of each result file written by `--measure` (others: none)."""
    out = []
    for p in paths:
        if str(p).endswith(".jsonl"):
            continue
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read result file {p}: {e}") from None
        sec = doc.get("pykernels_tokens") if isinstance(doc, dict) else None
        if isinstance(sec, dict):
            sec = dict(sec)
            sec.setdefault("threads", (doc.get("machine_info") or {}).get("torch_threads"))
            out.append((str(p), sec))
    return out


WORKLOAD_KEYS = ("model", "prompt", "context", "batch", "fused")


def recorded_workload(recs: list[tuple[str, dict]]) -> dict:
    """{model (a models.ModelConfig), prompt, context, batch, threads} the measurement files agree on; a
    key they disagree on is an error naming the files."""
    out = {}
    for key in (*WORKLOAD_KEYS, "threads"):
        seen = {}
        for path, sec in recs:
            v = sec.get(key)
            if v is None:
                continue
            seen.setdefault(json.dumps(v, sort_keys=True), path)
        if len(seen) > 1:
            (v1, p1), (v2, p2) = list(seen.items())[:2]
            raise ValueError(f"the result files were measured for different values of {key}: {v1} in {p1}, {v2} in "
                             f"{p2}; report them separately (or pass --{key})")
        if seen:
            v = json.loads(next(iter(seen)))
            out[key] = _models.from_dict(v, f"the model recorded in {seen[json.dumps(v, sort_keys=True)]}") \
                if key == "model" else v
    return out


def load_step_ops(recs: list[tuple[str, dict]]) -> list[dict]:
    """The rest-of-a-step rows (tokens/stepops.py) the measurement files hold; a later file replaces an
    earlier one's row of the same (device, dtype, phase, name)."""
    rows = {}
    for _, sec in recs:
        for r in sec.get("step_ops") or []:
            rows[(r.get("device"), r.get("dtype"), r.get("phase"), r.get("name"))] = r
    return list(rows.values())


def load_measurements(paths) -> list[Measurement]:
    """All measurements of the given files; a later file's result for a case replaces an earlier one."""
    out = []
    for p in paths:
        if str(p).endswith(".jsonl"):  # a harness journal (results.py): one case per line
            from ..harness import results

            entries = results.read_journal(p)
            doc = {"benchmarks": [{"extra_info": e["extra_info"]} for e in entries
                                  if e.get("status") == "measured" and isinstance(e.get("extra_info"), dict)]}
        else:
            try:
                doc = json.loads(Path(p).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read result file {p}: {e}") from None
        out += measurements_from(doc, str(p))
    return out


# ---------------------------------------------------------------------------------------------------
# the arithmetic


@dataclass
class PhaseResult:
    name: str
    tokens: int
    time_s: float | None = None  # None: incomplete
    missing: list[str] = field(default_factory=list)
    share: dict[str, float] = field(default_factory=dict)  # family -> fraction of the phase's kernel time
    noise: float = 0.0  # relative, time-weighted
    joules: float | None = None
    energy_note: str = ""
    rest_s: float | None = None  # the rest of the step (stepops rows), where measured

    @property
    def complete(self) -> bool:
        return self.time_s is not None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.time_s if self.complete else None

    @property
    def joules_per_token(self) -> float | None:
        return None if self.joules is None else self.joules / self.tokens

    @property
    def with_rest_s(self) -> float | None:
        """Kernels + the rest of the step: the phase's predicted time, where both are known."""
        return None if self.time_s is None or self.rest_s is None else self.time_s + self.rest_s


@dataclass
class StackResult:
    device: str
    dtype: str
    backend: str
    tier: str
    prefill: PhaseResult
    decode: PhaseResult
    # penalty in tokens/s: 1 - tps(this) / tps(reference); per phase; None where not computable
    vs_native: dict[str, float | None] = field(default_factory=dict)
    vs_vendor: dict[str, float | None] = field(default_factory=dict)
    vendor_name: dict[str, str | None] = field(default_factory=dict)
    native_name: dict[str, str | None] = field(default_factory=dict)
    within_noise: dict[str, bool] = field(default_factory=dict)

    @property
    def ttft_s(self):
        return self.prefill.time_s

    @property
    def tpot_s(self):
        return self.decode.time_s

    @property
    def tokens_per_s(self):
        return self.decode.tokens_per_s

    def phase(self, name: str) -> PhaseResult:
        return self.prefill if name == "prefill" else self.decode


def _phase_result(phase: _models.Phase, found: dict) -> PhaseResult:
    r = PhaseResult(phase.name, phase.tokens)
    total, by_fam, noise, joules, notes = 0.0, {}, 0.0, 0.0, set()
    for c in phase.calls:
        m = found.get(c.problem)
        if m is None:
            r.missing.append(f"{c.family} {c.problem.label()}")
            continue
        t = c.count * m.median_s
        total += t
        by_fam[c.family] = by_fam.get(c.family, 0.0) + t
        noise += t * m.spread
        if m.power_w is None or joules is None:
            joules = None
            notes.add(m.power_note)
        else:
            joules += c.count * m.energy_j if m.energy_j is not None else t * m.power_w
            notes.add(m.power_note)
    if r.missing:
        r.missing = sorted(set(r.missing))
        return r
    r.time_s = total
    r.share = {f: v / total for f, v in by_fam.items()}
    r.noise = noise / total
    r.joules = joules
    r.energy_note = "; ".join(sorted(notes))
    return r


def penalty(tps: float, ref_tps: float) -> float:
    """1 - throughput / reference throughput (docs/design.md): positive = slower than the reference."""
    return 1.0 - tps / ref_tps


def rest_totals(step_rows: list[dict], kv_append: str = "inplace") -> dict:
    """{(dtype, phase): seconds of the rest of a step} from stepops rows: sum of count x median of the rows
    that enter the total (one KV-cache append: `kv_append`). A phase with no rows has no entry."""
    from .stepops import KV_APPENDS

    if kv_append not in KV_APPENDS:
        raise ValueError(f"argument 'kv_append' must be one of {', '.join(KV_APPENDS)}, got {kv_append!r}")
    out: dict = {}
    for r in step_rows:
        name = r["name"]
        if name.startswith("kv_append_") and name != f"kv_append_{kv_append}":
            continue
        k = (r["dtype"], r["phase"])
        out[k] = out.get(k, 0.0) + r["count"] * r["median_s"]
    return out


def compute(workload: _models.Workload, measurements: list[Measurement], step_rows: list[dict] | None = None,
            kv_append: str = "inplace") -> list[StackResult]:
    """One StackResult per (device, dtype, backend) seen in the measurements; with `step_rows`
    (load_step_ops) each phase also carries the rest of the step of its dtype (rest_s)."""
    groups: dict[tuple, dict] = {}
    tiers: dict[tuple, str] = {}
    wanted = set(workload.problems())
    for m in measurements:
        key = (m.device, m.dtype, m.backend)
        groups.setdefault(key, {})
        tiers[key] = m.tier
        if m.problem in wanted:
            groups[key][m.problem] = m  # later files win
    stacks = [
        StackResult(
            d,
            dt,
            b,
            tiers[(d, dt, b)],
            _phase_result(workload.prefill, found),
            _phase_result(workload.decode, found),
        )
        for (d, dt, b), found in sorted(groups.items())
    ]
    rest = rest_totals(step_rows or [], kv_append)
    for st in stacks:
        for ph in ("prefill", "decode"):
            st.phase(ph).rest_s = rest.get((st.dtype, ph))
    for s in stacks:
        peers = [p for p in stacks if (p.device, p.dtype) == (s.device, s.dtype)]
        for ph in ("prefill", "decode"):
            mine = s.phase(ph)
            native = next((p for p in peers if p.tier == "native" and p.phase(ph).complete), None)
            vendors = [p for p in peers if p.tier == "vendor" and p.phase(ph).complete]
            best = max(vendors, key=lambda p: p.phase(ph).tokens_per_s, default=None)
            s.vendor_name[ph] = best.backend if best else None
            s.native_name[ph] = native.backend if native else None
            for ref, dst in ((native, s.vs_native), (best, s.vs_vendor)):
                if ref is None or not mine.complete:
                    dst[ph] = None
                    continue
                dst[ph] = penalty(mine.tokens_per_s, ref.phase(ph).tokens_per_s)
                if ref is native:
                    s.within_noise[ph] = abs(dst[ph]) <= mine.noise + ref.phase(ph).noise
    return stacks


# ---------------------------------------------------------------------------------------------------
# formatting


def _ms(s):
    if s is None:
        return "incomplete"
    return f"{s * 1e3:,.0f}" if s >= 10 else f"{s * 1e3:.4g}"  # 12,345 ms rather than 1.234e+04


def _pct(x, noise=None, is_ref=False):
    """A tok/s penalty (1 - speedup) shown as the speedup over the reference, the report's convention."""
    if is_ref:
        return "ref"
    if x is None:
        return "–"
    return fmt_speedup(1.0 - x, bool(noise))


def _energy(ph: PhaseResult, per: str):
    if not ph.complete:
        return "incomplete"
    if ph.joules is None:
        return "not available"
    return f"{ph.joules_per_token:.4g} J/{per}"


def load_coverage(path, model_name: str, *, prompt: int | None = None, context: int | None = None,
                  batch: int | None = None, dtypes=None, threads: int | None = None) -> dict:
    """{(backend, dtype, phase): coverage} of a pykernels.tokens.layer result file for `model_name`. The file
    must match the report: model, prompt, context, batch, threads (where both sides know them) and hold
    every dtype in `dtypes`; a mismatch is a ValueError naming both values."""
    try:
        doc = json.loads(Path(path).read_text())
        name, results = doc["model"]["name"], doc["results"]
        have = {(r["backend"], r["dtype"], r["phase"]): r["coverage"] for r in results}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read layer result file {path}: {e}") from None
    if name != model_name:
        raise ValueError(f"layer result file {path} is for model {name!r}, not {model_name!r}")
    for key, want in (("prompt", prompt), ("context", context), ("batch", batch), ("threads", threads)):
        got = doc.get(key)
        if want is not None and got is not None and got != want:
            raise ValueError(f"layer result file {path} was measured with {key} {got}, the report is for {key} "
                             f"{want}: its coverage does not apply")
    missing = sorted(set(dtypes or ()) - {dt for _, dt, _ in have})
    if missing:
        raise ValueError(f"layer result file {path} has no {', '.join(missing)} results (it has "
                         f"{', '.join(sorted({dt for _, dt, _ in have}))}): its coverage does not apply")
    return have


def cost_per_million(tokens_per_s: float | None, price_per_hour: float) -> float | None:
    return None if not tokens_per_s else price_per_hour / 3600.0 / tokens_per_s * 1e6


def rows(stacks: list[StackResult], price_per_hour: float | None = None) -> list[dict]:
    """Flat numbers, one dict per stack (the CSV)."""
    out = []
    for s in stacks:
        pre, dec = s.prefill, s.decode
        r = {
            "device": s.device,
            "dtype": s.dtype,
            "backend": s.backend,
            "tier": s.tier,
            "ttft_s": pre.time_s,
            "prefill_tokens_per_s": pre.tokens_per_s,
            "tpot_s": dec.time_s,
            "tokens_per_s": dec.tokens_per_s,
            "rest_prefill_s": pre.rest_s,
            "rest_decode_s": dec.rest_s,
            "ttft_with_rest_s": pre.with_rest_s,
            "tpot_with_rest_s": dec.with_rest_s,
            "prefill_gemm_share": pre.share.get("gemm"),
            "prefill_attention_share": pre.share.get("attention"),
            "decode_gemm_share": dec.share.get("gemm"),
            "decode_attention_share": dec.share.get("decode"),
            "penalty_vs_native_decode": s.vs_native.get("decode"),
            "penalty_vs_native_prefill": s.vs_native.get("prefill"),
            "best_vendor_decode": s.vendor_name.get("decode"),
            "penalty_vs_vendor_decode": s.vs_vendor.get("decode"),
            "best_vendor_prefill": s.vendor_name.get("prefill"),
            "penalty_vs_vendor_prefill": s.vs_vendor.get("prefill"),
            "noise_prefill": pre.noise if pre.complete else None,
            "noise_decode": dec.noise if dec.complete else None,
            "joules_per_prompt_token": pre.joules_per_token,
            "joules_per_output_token": dec.joules_per_token,
            "missing": "; ".join(pre.missing + dec.missing),
        }
        if price_per_hour is not None:
            r["usd_per_million_output_tokens"] = cost_per_million(dec.tokens_per_s, price_per_hour)
            r["usd_per_million_prompt_tokens"] = cost_per_million(pre.tokens_per_s, price_per_hour)
        out.append(r)
    return out


def to_csv(stacks: list[StackResult], price_per_hour: float | None = None) -> str:
    rs = rows(stacks, price_per_hour)
    buf = io.StringIO()
    if rs:
        w = csv.DictWriter(buf, fieldnames=list(rs[0]), lineterminator="\n")
        w.writeheader()
        for r in rs:
            w.writerow(
                {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
            )
    return buf.getvalue()


def to_markdown(
    workload: _models.Workload,
    stacks: list[StackResult],
    price_per_hour: float | None = None,
    sources: list[str] | None = None,
    coverage: dict | None = None,
    step_rows: list[dict] | None = None,
    kv_append: str = "inplace",
    notes: list[str] | None = None,
    fmt: str = "md",
    color: bool = False,
) -> str:
    """`coverage`: {(backend, dtype, phase): kernels / layer} from pykernels.tokens.layer results (load_coverage);
    `step_rows`: the rest-of-a-step rows (load_step_ops); `notes`: lines about the measurement (threads, cold).
    fmt="terminal": the same content as plain text with terminal tables (what `pykernels tokens` prints)."""
    m, w = workload.model, workload
    tbl: list = []  # (line index, header, rows) of each table, rendered at the end
    lines = [
        f"# Tokens: {m.name} — prompt {w.prompt}, decode at context {w.context}, batch {w.batch}",
        "",
        (
            f"{m.layers} layers, hidden {m.hidden}, {m.heads} query / {m.kv_heads} KV heads × {m.head_dim}, "
            f"FFN {m.ffn}, vocabulary {m.vocab}; {m.parameters() / 1e9:.3f} B parameters. "
            f"Prefill {w.prefill.flops() / 1e12:.4g} TFLOP, decode step {w.decode.flops() / 1e9:.4g} GFLOP, "
            f"{len(w.problems())} distinct kernel problems"
            + ("." if w.fused else " (q/k/v and gate/up as separate linears: --unfused).")
        ),
        "",
        (
            "TTFT and TPOT are sums of measured kernel medians × counts (small ops between kernels not "
            "included: see docs/tokens.md for the measured coverage). Speedup = tokens/s ÷ reference "
            'tokens/s (×; penalty = 1 − speedup); "(~1.02×)" = inside the measured spread.'
        ),
        "",
    ]
    if sources:
        lines += ["Results: " + ", ".join(f"`{s}`" for s in sources), ""]
    if notes:
        lines += [*notes, ""]
    for dev, dt in sorted({(s.device, s.dtype) for s in stacks}):
        group = [s for s in stacks if (s.device, s.dtype) == (dev, dt)]
        lines += [f"## {dev}, {dt}", ""]
        head = [
            "backend",
            "tier",
            "TTFT ms",
            "prefill tok/s",
            "TPOT ms",
            "tok/s",
            "prefill gemm/attn",
            "decode gemm/attn",
            "tok/s speedup over native (decode / prefill)",
            "over best vendor (decode / prefill)",
            "energy (decode)",
        ]
        if price_per_hour is not None:
            head.append(f"$/M output tok @ ${price_per_hour:g}/h")
        tbl.append((len(lines), head, []))
        lines.append(None)
        for s in group:
            pre, dec = s.prefill, s.decode

            def share(ph, att):
                return (
                    "–"
                    if not ph.complete
                    else f"{ph.share.get('gemm', 0) * 100:.0f}/{ph.share.get(att, 0) * 100:.0f}%"
                )

            vend = " / ".join(
                _pct(s.vs_vendor.get(p), is_ref=s.vendor_name.get(p) == s.backend)
                + (f" ({s.vendor_name[p]})" if s.vendor_name.get(p) not in (None, s.backend) else "")
                for p in ("decode", "prefill")
            )
            cells = [
                s.backend,
                s.tier,
                _ms(pre.time_s),
                "–" if not pre.complete else f"{pre.tokens_per_s:.4g}",
                _ms(dec.time_s),
                "–" if not dec.complete else f"{dec.tokens_per_s:.4g}",
                share(pre, "attention"),
                share(dec, "decode"),
                " / ".join(
                    _pct(s.vs_native.get(p), s.within_noise.get(p), s.native_name.get(p) == s.backend)
                    for p in ("decode", "prefill")
                ),
                vend,
                _energy(dec, "token"),
            ]
            if price_per_hour is not None:
                c = cost_per_million(dec.tokens_per_s, price_per_hour)
                cells.append("–" if c is None else f"{c:.4g}")
            tbl[-1][2].append(cells)
        lines.append("")
        for s in group:
            miss = s.prefill.missing + s.decode.missing
            if miss:
                lines.append(f"- **{s.backend} incomplete**: no result for {'; '.join(miss)}")
        done = [s.decode for s in group if s.decode.complete]
        notes = sorted({ph.energy_note for ph in done if ph.energy_note})
        if done and all(ph.joules is None for ph in done):
            lines.append("- energy: not available: " + " / ".join(notes))
        elif notes:
            lines.append("- energy: " + " / ".join(notes))
        lines.append("")
    if step_rows:
        lines += _rest_markdown(stacks, step_rows, kv_append)
    if coverage:
        lines += [
            "## With the small ops",
            "",
            (
                "Kernel sums divided by the share of a decoder layer's time the kernels cover (measured by "
                "pykernels.tokens.layer on the same model's layer): an estimate of TTFT / TPOT including norms, "
                "rotary embedding, activation and residuals."
            ),
            "",
        ]
        tbl.append((len(lines), ["device", "dtype", "backend", "prefill coverage", "TTFT ms incl. small ops",
                                 "decode coverage", "TPOT ms incl. small ops"], []))
        lines.append(None)
        for s in stacks:
            cp, cd = (
                coverage.get((s.backend, s.dtype, "prefill")),
                coverage.get((s.backend, s.dtype, "decode")),
            )
            if cp is None and cd is None:
                continue
            tbl[-1][2].append([
                s.device, s.dtype, s.backend, "–" if cp is None else f"{cp * 100:.1f}%",
                "–" if cp is None or s.ttft_s is None else _ms(s.ttft_s / cp),
                "–" if cd is None else f"{cd * 100:.1f}%",
                "–" if cd is None or s.tpot_s is None else _ms(s.tpot_s / cd)])
        lines.append("")
    if not stacks:
        lines.append("No results for this model's kernel problems in the given files.")
    for i, head, body in tbl:  # numbers right-aligned: every column after the first three text ones
        align = "lll" + "r" * (len(head) - 3) if head[0] == "device" else "ll" + "r" * (len(head) - 2)
        lines[i] = (markdown(head, body, align) if fmt == "md" else table(head, body, align, color=color)).rstrip("\n")
    if fmt != "md":
        lines = [_plain(x) for x in lines]
    return "\n".join(lines).rstrip() + "\n"


def _plain(line: str) -> str:
    """A Markdown heading or bold marker as terminal text (tables are rendered separately)."""
    if line.startswith("#"):
        return line.lstrip("#").strip().upper() if line.startswith("# ") else line.lstrip("#").strip()
    return line.replace("**", "").replace("`", "")


def _rest_markdown(stacks: list[StackResult], step_rows: list[dict], kv_append: str) -> list[str]:
    lines = [
        "## The rest of a step",
        "",
        (
            "The torch ops between the kernels (tokens/stepops.py), timed on the model's shapes: what every "
            f"backend here runs between its kernels. The total counts one KV-cache append ({kv_append}); "
            "`dispatch` is the eager cost of the layer's other ops (views, reshapes, copies)."
        ),
        "",
        "| dtype | phase | op | shape | calls | µs per call | ms per phase | cold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(step_rows, key=lambda r: (r["dtype"], r["phase"] != "prefill")):
        counted = not r["name"].startswith("kv_append_") or r["name"] == f"kv_append_{kv_append}"
        name = r["name"] if counted else f"({r['name']}, not counted)"
        lines.append(
            f"| {r['dtype']} | {r['phase']} | {name} | {r['shape']} | {r['count']} | {r['median_s'] * 1e6:.4g} | "
            f"{r['count'] * r['median_s'] * 1e3:.4g} | {'yes' if r.get('cold') else 'no'} |"
        )
    lines += [
        "",
        ("| device | dtype | backend | TTFT ms kernels + rest | kernels' share | TPOT ms kernels + rest | "
        "kernels' share | tok/s |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for st in stacks:
        pre, dec = st.prefill, st.decode
        if pre.with_rest_s is None and dec.with_rest_s is None:
            continue

        def cells(ph):
            if ph.with_rest_s is None:
                return ["–", "–"]
            return [_ms(ph.with_rest_s), f"{ph.time_s / ph.with_rest_s * 100:.1f}%"]

        tps = "–" if dec.with_rest_s is None else f"{dec.tokens / dec.with_rest_s:.4g}"
        lines.append(f"| {st.device} | {st.dtype} | {st.backend} | " + " | ".join(cells(pre) + cells(dec))
                     + f" | {tps} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------
# command line (the `tokens` subcommand of pykernels.cli)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tokens",
        help="tokens/s, TTFT, TPOT, energy and cost per token for a reference model",
        description=__doc__.split("\n\n")[0],
    )
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="*", help="result files (pytest-benchmark JSON)")
    p.add_argument(
        "--model",
        default=None,
        help=f"built-in model ({', '.join(_models.builtin_names())}) or a .json model file (default: the one "
        "a --measure file recorded, else ref-7b-2k)",
    )
    p.add_argument(
        "--prompt", type=int, default=None, help="prompt tokens for TTFT (default: the model's context)"
    )
    p.add_argument(
        "--context", type=int, default=None, help="context of the decode step (default: the model's)"
    )
    p.add_argument("--layers", type=int, default=None,
                   help="override the model's layer count (e.g. --model ref-7b-2k --layers 2 for --check hf)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per decode step (default: what a --measure file recorded, else 1)")
    p.add_argument("--unfused", action="store_true",
                   help="separate q/k/v and gate/up projections (as transformers' Llama runs them) instead of fused")
    p.add_argument("--kv-append", default="inplace", choices=("inplace", "paged", "cat"),
                   help="the KV-cache append counted in the rest of a step (default inplace; cat: transformers' "
                   "DynamicCache)")
    p.add_argument(
        "--price-per-hour", type=float, default=None, help="price of the device per hour -> $/M tokens"
    )
    p.add_argument("--csv", type=Path, default=None, help="also write the CSV here")
    p.add_argument("--md", type=Path, nargs="?", const=_STDOUT, default=None, metavar="FILE",
                   help="also write the Markdown here; --md alone prints Markdown instead of the terminal tables")
    p.add_argument(
        "--list-problems", action="store_true", help="print the model's kernel problems and counts"
    )
    p.add_argument(
        "--layer-results",
        type=Path,
        default=None,
        help="a pykernels.tokens.layer result (JSON) of the same model: adds TTFT/TPOT including the small ops",
    )
    g = p.add_argument_group("measuring the model's shapes directly (without the pytest sweep)")
    g.add_argument(
        "--measure", action="store_true", help="time each distinct problem of the model and write --out"
    )
    g.add_argument("--backend", action="append", default=None, help="backend to measure (repeatable)")
    g.add_argument(
        "--dtype", action="append", default=None, help="dtype to measure (repeatable; default float32)"
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--out", type=Path, default=None, help="result file the measurement writes")
    g.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case at most (default 1)")
    g.add_argument(
        "--no-check", action="store_true", help="do not check outputs against the float64 reference"
    )
    g.add_argument("--warm", action="store_true",
                   help="time kernels with warm caches (default: cold, a decode-step kernel rotating through copies of "
                   "its weights and KV cache larger than the last-level cache, a prefill kernel's every operand "
                   "evicted before each call)")
    g.add_argument("--no-step-ops", action="store_true",
                   help="do not time the rest of a step (norms, rotary, SiLU, residuals, cache append, argmax)")
    g.add_argument("--check", choices=("hf",), default=None,
                   help="hf: time transformers' LlamaForCausalLM of the same shapes (random weights) and print "
                   "measured / predicted TTFT and TPOT per row (needs the 'hf' extra)")


def _err(msg: str) -> int:
    print(f"pykernels tokens: {msg}", file=sys.stderr)
    return 2


def _workload(args, rec: dict) -> _models.Workload:
    """The report's workload: what the command line says, else what the measurement recorded (when the
    model is the recorded one), else the defaults (ref-7b-2k, its context, batch 1)."""
    model = _models.load(args.model) if args.model is not None else rec.get("model") or _models.load("ref-7b-2k")
    if getattr(args, "layers", None) is not None:  # e.g. ref-7b-2k cut to 2 layers for --check hf
        if args.layers < 1:
            raise ValueError(f"argument '--layers' must be >= 1, got {args.layers}")
        model = replace(model, layers=args.layers)
    same = rec.get("model") is not None and rec["model"] == model
    kw = {}
    for key in ("prompt", "context", "batch"):
        v = getattr(args, key)
        kw[key] = v if v is not None else (rec.get(key) if same else None)
    fused = not getattr(args, "unfused", False) and rec.get("fused", True)
    return _models.derive(model, prompt=kw["prompt"], context=kw["context"], batch=kw["batch"] or 1, fused=fused)


def run(args) -> int:
    sources = [str(p) for p in args.results]
    try:
        rec = {} if args.measure else recorded_workload(recorded(sources))
        wl = _workload(args, rec)
    except ValueError as e:
        return _err(str(e))
    model = wl.model
    if args.list_problems:
        for ph in wl.phases:
            print(f"{ph.name} ({ph.tokens} tokens, {ph.flops() / 1e9:.4g} GFLOP):")
            for c in ph.calls:
                print(f"  {c.count:4d} x {c.role:10s} {c.family:9s} {c.problem.label()}")
        return 0
    if args.md is not None and args.md != _STDOUT and args.md.suffix in (".json", ".jsonl"):
        return _err(f"--md {args.md}: refusing to write Markdown over a result file (a bare --md "
                    "after the result files prints it)")
    if args.check == "hf":
        from .check_hf import run_check

        return run_check(args, wl)
    if args.measure:
        from .measure import measure

        if args.out is None:
            return _err("--measure needs --out FILE")
        bar: dict = {}

        def start(what, total):  # which problem, how many left, elapsed, estimated time left (stderr)
            if not bar:
                bar["p"] = Progress(total, label="tokens --measure")
            bar["p"].step(what)

        def log(line):
            if bar:
                bar["p"].close()
            print(line, flush=True)

        measure(
            wl,
            start=start,
            log=log,
            backends=args.backend or ["native", "torch"],
            dtypes=args.dtype or ["float32"],
            device=args.device,
            out=args.out,
            budget_s=args.budget,
            check=not args.no_check,
            command=_command_line(),
            cold=not args.warm,
            step_ops=not args.no_step_ops,
        )
        if bar:
            bar["p"].close()
        sources.append(str(args.out))
    if not sources:
        return _err("give result files, or --measure")
    try:
        recs = recorded(sources)
        threads = recorded_workload(recs).get("threads")
        step_rows = load_step_ops(recs)
        stacks = compute(wl, load_measurements(sources), step_rows, args.kv_append)
    except ValueError as e:
        return _err(str(e))
    notes = []
    if recs:
        t = "?" if threads is None else threads
        colds = {bool(sec.get("cold")) for _, sec in recs}
        methods = {sec.get("cold_method") for _, sec in recs if sec.get("cold")}  # as the measurement recorded it
        how = f" ({methods.pop()})" if len(methods) == 1 and None not in methods else ""
        notes.append(f"Measured with {t} thread{'' if t == 1 else 's'} (torch and OpenMP); kernels timed "
                     + (f"with cold caches{how}" if colds == {True}
                        else "warm" if colds == {False} else "cold in some files, warm in others") + ".")
    coverage = None
    if args.layer_results:
        try:
            coverage = load_coverage(args.layer_results, model.name, prompt=wl.prompt, context=wl.context,
                                     batch=wl.batch, dtypes={st.dtype for st in stacks}, threads=threads)
        except ValueError as e:
            return _err(str(e))
    md = to_markdown(wl, stacks, args.price_per_hour, sources, coverage, step_rows, args.kv_append, notes)
    if args.md == _STDOUT:  # --md alone: the Markdown instead of the terminal tables
        print(md)
    else:
        print(to_markdown(wl, stacks, args.price_per_hour, sources, coverage, step_rows, args.kv_append, notes,
                          fmt="terminal", color=isatty()))
    if args.md and args.md != _STDOUT:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(to_csv(stacks, args.price_per_hour))
    if not any(s.prefill.complete or s.decode.complete for s in stacks):
        print(f"pykernels tokens: no stack is complete: the result files hold none of the kernel shapes of "
              f"{model.name} for a whole phase (see the 'incomplete' lines; measure them with "
              f"`pykernels tokens --measure` or `pykernels bench --model {model.name}`)", file=sys.stderr)
        return 1
    return 0


def _command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "python -m pykernels.tokens" if prog in ("metering.py", "__main__.py") else prog
    return " ".join([prog, *sys.argv[1:]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pykernels tokens", description=__doc__.split("\n\n")[0])
    configure_parser(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
