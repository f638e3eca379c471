"""The conformance matrix: which cases a backend must pass, as plain data (JSON-able dicts) so that
they can be sent to a worker process."""

from __future__ import annotations

from ..kernels import PROBLEMS

# Odd sizes around common block sizes (16, 32, 64, 128), M = 1, S = 1, context length 1,
# non-multiples of the block size, GQA ratios 1/4/8, causal and not, contiguous and paged, ragged.
GEMM = [
    (1, 1, 1), (1, 127, 65), (1, 1024, 1024), (7, 63, 64), (16, 16, 16), (33, 1, 129), (63, 65, 127),
    (64, 64, 64), (65, 129, 31), (127, 1025, 63), (128, 256, 1000), (257, 33, 513),
]
ATTENTION = [  # (B, Hq, Hkv, S, D)
    (1, 1, 1, 1, 64), (1, 2, 2, 7, 128), (2, 4, 1, 63, 64), (1, 8, 2, 64, 128), (1, 8, 1, 65, 64),
    (1, 4, 4, 127, 128), (1, 4, 1, 129, 64), (2, 2, 2, 257, 128),
]
DECODE = [  # (B, Hq, Hkv, context, D, paged, block_size, ragged)
    (1, 1, 1, 1, 64, False, 16, False), (1, 8, 8, 1, 128, True, 16, False), (3, 8, 8, 100, 128, False, 16, True),
    (4, 32, 8, 1000, 128, True, 16, True), (2, 8, 1, 65, 64, True, 7, True), (5, 16, 2, 513, 128, True, 32, True),
    (2, 4, 4, 3, 64, True, 1, True), (1, 32, 4, 2049, 128, False, 16, False), (6, 8, 2, 33, 64, False, 16, True),
]
DTYPES = ("float32", "float16", "bfloat16")

# Fixed performance shapes (modest, so that a CPU run takes seconds per backend).
PERF = [
    ("gemm", {"M": 1024, "N": 1024, "K": 1024}),
    ("gemm", {"M": 8, "N": 4096, "K": 4096}),
    ("attention", {"B": 1, "Hq": 8, "Hkv": 8, "S": 1024, "D": 128, "causal": True}),
    ("decode", {"B": 8, "Hq": 32, "Hkv": 8, "context": 2048, "D": 128, "paged": True, "block_size": 16,
                "ragged": False}),
]


def problem_from(family: str, params: dict):
    return PROBLEMS[family](**params)


# ---------------------------------------------------------------------------------------------------
# Cases derived from the public API's parameters (inspect.signature of pykernels.ops): every parameter of
# pk.gemm / pk.attention / pk.decode has an entry in VARIATIONS, and `uncovered_parameters()` names any that
# has none (a test fails then, so that a new parameter cannot be left out silently).

# Scales besides the default 1/sqrt(D): small (flat softmax), large (peaked), exactly 1 and negative (the
# contract allows any finite non-zero scale; a negative one turns the attention upside down).
SCALES = (0.05, 0.5, 1.0, 2.0, -0.5)
PARAM_ATTENTION = {"B": 1, "Hq": 4, "Hkv": 2, "S": 33, "D": 64, "causal": False}
PARAM_DECODE = {"B": 3, "Hq": 8, "Hkv": 2, "context": 67, "D": 64, "paged": False, "block_size": 16, "ragged": True}
ODD_S = (1, 17, 97)              # S = 1 and S that is no multiple of any block size (16, 32, 64, 128)
BLOCK_SIZES = (3, 5, 16, 48)     # none divides the context 67 (a prime): every sequence ends in a partial block


def gqa_ratios() -> list[int]:
    """Every Hq/Hkv ratio of the shape matrix (attention and decode), plus 2."""
    return sorted({hq // hkv for _, hq, hkv, *_ in ATTENTION} | {hq // hkv for _, hq, hkv, *_ in DECODE} | {2})


def _attention_variations(param: str) -> list[dict] | None:
    base = PARAM_ATTENTION
    if param == "scale":
        return [dict(base, scale=s, causal=c) for s in SCALES for c in (False, True)]
    if param == "causal":
        return [dict(base, S=S, causal=c) for S in ODD_S for c in (False, True)]
    if param in ("k", "v"):  # the kv-head count: every GQA ratio, causal and not
        return [dict(base, B=2, Hq=8, Hkv=8 // r, S=41, causal=c) for r in gqa_ratios() for c in (False, True)]
    if param == "q":
        return [dict(base, B=3, Hq=2, Hkv=1, S=1, D=128), dict(base, S=129, D=128, causal=True)]
    return None


def _decode_variations(param: str) -> list[dict] | None:
    base = PARAM_DECODE
    if param == "scale":
        return [dict(base, scale=s, paged=p) for s in SCALES for p in (False, True)]
    if param == "block_table":  # paged, block sizes that do not divide the context
        return [dict(base, paged=True, block_size=bs) for bs in BLOCK_SIZES]
    if param in ("k_cache", "v_cache"):  # every GQA ratio, contiguous and paged
        return [dict(base, B=2, Hq=8, Hkv=8 // r, paged=p, block_size=5) for r in gqa_ratios() for p in (False, True)]
    if param == "context_lens":  # lengths 1 and ragged
        return [dict(base, B=4, context=1, ragged=False, paged=True, block_size=3), dict(base, B=5, context=40)]
    if param == "q":
        return [dict(base, B=1, Hq=1, Hkv=1, D=128)]
    return None


def _gemm_variations(param: str) -> list[dict] | None:
    if param in ("a", "b"):
        return [{"M": 3, "N": 1, "K": 97}, {"M": 1, "N": 129, "K": 1}]
    return None


_VARIATIONS = {"gemm": _gemm_variations, "attention": _attention_variations, "decode": _decode_variations}
# Parameters that are not a property of the computation; every case exercises them.
NOT_A_CASE = {"backend": "the backend under test (every case)"}


def api_parameters(family: str) -> list[str]:
    """The parameter names of pk.<family>, read from its signature (not a list kept by hand)."""
    import inspect

    from .. import ops

    return list(inspect.signature(getattr(ops, family)).parameters)


def uncovered_parameters() -> list[str]:
    """'family.param' for every parameter of the public API that has no conformance case."""
    out = []
    for family, var in _VARIATIONS.items():
        for p in api_parameters(family):
            if p not in NOT_A_CASE and not var(p):
                out.append(f"{family}.{p}")
    return out


def parameter_cases() -> list[dict]:
    """One case per (family, API parameter, value) of VARIATIONS, in every dtype: kind 'parameter'."""
    out, seen = [], {}
    for dt in DTYPES:
        for family, var in _VARIATIONS.items():
            for p in api_parameters(family):
                for params in var(p) or ():
                    key = (dt, family, tuple(sorted(params.items())))
                    if key in seen:  # the same case exercises several parameters
                        seen[key]["covers"].append(p)
                        continue
                    seen[key] = {"kind": "parameter", "family": family, "params": params, "dtype": dt, "covers": [p]}
                    out.append(seen[key])
    return out


def correctness_cases() -> list[dict]:
    out = []
    for dt in DTYPES:
        for M, N, K in GEMM:
            out.append({"family": "gemm", "params": {"M": M, "N": N, "K": K}, "dtype": dt})
        for s in ATTENTION:
            for causal in (False, True):
                out.append({"family": "attention", "dtype": dt,
                            "params": dict(zip(("B", "Hq", "Hkv", "S", "D"), s), causal=causal)})
        for s in DECODE:
            out.append({"family": "decode", "dtype": dt,
                        "params": dict(zip(("B", "Hq", "Hkv", "context", "D", "paged", "block_size", "ragged"), s))})
    return [dict(c, kind="correctness") for c in out]


# Robustness probes per family: one mid-size odd shape each.
ROBUST = {
    "gemm": {"M": 33, "N": 65, "K": 127},
    "attention": {"B": 1, "Hq": 4, "Hkv": 2, "S": 65, "D": 64, "causal": True},
    "decode": {"B": 3, "Hq": 8, "Hkv": 2, "context": 70, "D": 64, "paged": True, "block_size": 16, "ragged": True},
}
# Calls straight into the backend's method (not through pykernels' shared validation) with edge shapes:
# the backend must answer correctly or raise; it must never crash.
DIRECT_EDGES = {
    "gemm": [{"M": 1, "N": 1, "K": 1}, {"M": 1, "N": 3, "K": 1000}, {"M": 1000, "N": 1, "K": 3}],
    "attention": [{"B": 1, "Hq": 1, "Hkv": 1, "S": 1, "D": 64, "causal": True},
                  {"B": 3, "Hq": 8, "Hkv": 1, "S": 2, "D": 128, "causal": False}],
    "decode": [{"B": 1, "Hq": 1, "Hkv": 1, "context": 1, "D": 64, "paged": True, "block_size": 1, "ragged": False},
               {"B": 2, "Hq": 8, "Hkv": 8, "context": 1, "D": 128, "paged": False, "block_size": 16, "ragged": False}],
}


def robustness_cases() -> list[dict]:
    out = []
    for dt in DTYPES:
        for fam, params in ROBUST.items():
            for kind in ("nan", "inf", "determinism", "bad_input", "fresh_inputs"):
                out.append({"kind": kind, "family": fam, "params": params, "dtype": dt})
            for p in DIRECT_EDGES[fam]:
                out.append({"kind": "direct_edge", "family": fam, "params": p, "dtype": dt})
    return out


def perf_cases() -> list[dict]:
    return [{"kind": "perf", "family": f, "params": p, "dtype": dt} for dt in ("float32", "bfloat16", "float16")
            for f, p in PERF]


def case_id(case: dict) -> str:
    prob = problem_from(case["family"], case["params"])
    return f"{case['kind']}:{case['family']}:{case['dtype']}:{prob.label()}"
