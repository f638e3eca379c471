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
            for kind in ("nan", "inf", "determinism", "bad_input"):
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
