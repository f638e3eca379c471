"""The conformance worker: a separate process that runs one case at a time for one backend, so that a
case that crashes the process (segfault, abort, device fault) costs that case, not the run.

Protocol: one JSON case per line on stdin; one JSON result per line on the file descriptor given by
--result-fd (stdout is redirected to stderr so that a backend's prints cannot corrupt the protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch

from .cases import problem_from

PASS, FAIL, UNSUPPORTED = "PASS", "FAIL", "UNSUPPORTED"


def load_plugins(specs) -> None:
    """Register backends given as 'module:attr' (a Backend subclass or instance) for this process."""
    from ..backends import registry

    for spec in specs or ():
        obj = registry._load_object(spec)
        inst = registry._instantiate(obj)
        registry.register(inst, source=f"--plugin {spec}", replace=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _poison(family: str, inputs: dict, value: float) -> None:
    """Put one non-finite value into an input. NaN goes into a query (or a row of A): every output that
    depends on it is NaN. Inf goes into a value row (or A): every output that attends to it is
    non-finite, with no ambiguity about inf - inf inside the softmax."""
    if family == "gemm":
        a = inputs["a"]
        a[a.shape[0] // 2, a.shape[1] // 2] = value
    elif family == "attention":
        # off every block boundary (S // 2 + 3): behind a causal mask a kernel that multiplies the V rows of a whole
        # tile by weights of exactly 0 carries an inf there into the earlier rows of its block (a warning below)
        t = inputs["q"] if math.isnan(value) else inputs["v"]
        t[0, 0, min(t.shape[2] - 1, t.shape[2] // 2 + 3), 0] = value
    elif math.isnan(value):
        q = inputs["q"]
        q[q.shape[0] - 1, 0, 0] = value
    else:  # token 0 of the last sequence, kv head 0
        b = inputs["q"].shape[0] - 1
        blk = b if inputs["block_table"] is None else int(inputs["block_table"][b, 0])
        inputs["v_cache"][blk, 0, 0, 0] = value


def _call(backend, family: str, inputs: dict, problem, *, direct: bool):
    import pykernels as pk

    if not direct:
        return getattr(pk, family)(**inputs, **problem.call_kwargs(), backend=backend)
    # Straight into the backend (the shared validation is bypassed on purpose).
    D = problem.params().get("D")
    scale = problem.params().get("scale") or (1.0 / math.sqrt(D) if D else None)
    if family == "gemm":
        return backend.gemm(inputs["a"], inputs["b"])
    if family == "attention":
        return backend.attention(inputs["q"], inputs["k"], inputs["v"], causal=problem.causal, scale=scale)
    return backend.decode(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["context_lens"],
                          inputs["block_table"], scale=scale)


# What each check is, for the report (failures_by_check) and the README's "What validate checks".
CHECKS = {
    "accuracy": "output within the dtype-aware tolerance of the float64 reference",
    "output": "a tensor of the right shape, dtype and device is returned",
    "raised": "a valid call does not raise",
    "input_integrity": "inputs bit-identical after the call (nothing modified in place)",
    "output_aliasing": "the output does not share memory with an input",
    "fresh_inputs": "a second call with fresh inputs of the same shape is right too (no memoized or first-call-only answers)",
    "nan_inf": "NaN/Inf in an input reach every output row that depends on it; finite rows stay right",
    "bad_input": "invalid input is rejected with ValueError/TypeError",
    "recheck_after_timing": "after the performance timing, fresh inputs of the same shape still give the right answer",
    "crash": "no case kills the process (segfault, abort)",
    "hang": "every case answers within the case timeout",
    "start": "the backend loads in a fresh worker process",
    "harness": "the conformance harness itself failed on the case",
}


def _fail(check: str, detail: str, **extra) -> dict:
    return {"status": FAIL, "check": check, "detail": detail, **extra}


def _snapshot(inputs: dict) -> dict:
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN payloads compare equal to themselves, +0 and -0 do not)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _integrity(inputs: dict, before: dict, out) -> dict | None:
    """A failure when the output shares memory with an input, or the backend modified an input in place."""
    if isinstance(out, torch.Tensor) and out.numel():
        o0 = out.untyped_storage().data_ptr()
        o1 = o0 + out.untyped_storage().nbytes()
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor) and t.numel():
                i0 = t.untyped_storage().data_ptr()
                if i0 < o1 and o0 < i0 + t.untyped_storage().nbytes():
                    return _fail("output_aliasing", f"the output shares memory with the input '{name}'")
    for name, old in before.items():
        new = inputs[name]
        if new.shape != old.shape or not torch.equal(_bits(new), _bits(old)):
            changed = int((_bits(new) != _bits(old)).sum()) if new.shape == old.shape else new.numel()
            return _fail("input_integrity", f"modified its input '{name}' in place ({changed} byte(s) changed)")
    return None


def _check_output(out, exp, dtype, device: str) -> dict:
    """Shape/dtype/device, then the error against the float64 reference."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(exp.reference.shape):
        return _fail("output", f"returned {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}, "
                               f"expected {tuple(exp.reference.shape)}")
    if out.dtype != dtype or out.device.type != device.split(":")[0]:
        return _fail("output", f"returned {out.dtype} on {out.device}, expected {dtype} on {device}")
    err, ok = exp.check(out)
    if not ok:
        return _fail("accuracy", f"error {err:.3g} > tolerance {exp.tolerance:.3g}", error=err,
                     tolerance=exp.tolerance)
    return {"status": PASS, "error": err, "tolerance": exp.tolerance, "detail": ""}


def _checked_call(backend, family, problem, dtype, device, seed: int, *, direct: bool = False) -> dict:
    """Fresh seeded inputs, one call, every per-call check (output, accuracy, input integrity, aliasing)."""
    from ..harness import verify

    inputs = problem.make_inputs(dtype, device=device, seed=seed)
    exp = verify.expected(problem, inputs)
    before = _snapshot(inputs)
    try:
        out = _call(backend, family, inputs, problem, direct=direct)
        _sync(device)
    except Exception as e:  # noqa: BLE001
        return _fail("raised", f"raised {type(e).__name__}: {e}", raised=True)
    return _integrity(inputs, before, out) or _check_output(out, exp, dtype, device)


def _bad_inputs(family: str, inputs: dict):
    """(description, kwargs) pairs that the public API must reject with ValueError/TypeError."""
    x = dict(inputs)
    first = "a" if family == "gemm" else "q"
    other = "b" if family == "gemm" else ("k" if family == "attention" else "k_cache")
    t = x[first]
    yield "mixed dtypes", {**x, other: x[other].to(torch.float64)}
    yield "wrong rank", {**x, first: t.reshape(-1)}
    yield "non-contiguous", {**x, first: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.shape[-1] > 1
                             and t.shape[-2] > 1 else t.expand(*t.shape[:-1], 2)}
    yield "empty", {**x, first: t[..., :0]}
    yield "not a tensor", {**x, first: t.tolist()}
    if family == "decode":
        bad = x["context_lens"].clone()
        bad[0] = 0
        yield "context length 0", {**x, "context_lens": bad}


def run_case(backend, device: str, case: dict) -> dict:
    import pykernels as pk

    from ..harness import verify
    from ..kernels import dtype_of

    family, kind = case["family"], case["kind"]
    dtype = dtype_of(case["dtype"])
    problem = problem_from(family, case["params"])
    reason = backend.supports(family, device, dtype, **problem.params())
    if reason is not None:
        return {"status": UNSUPPORTED, "detail": reason}
    inputs = problem.make_inputs(dtype, device=device, seed=case.get("seed", 0))
    if kind == "perf":
        return _perf(backend, problem, dtype, device, inputs, case)

    seed = case.get("seed", 0)
    if kind in ("correctness", "direct_edge", "parameter"):
        r = _checked_call(backend, family, problem, dtype, device, seed, direct=kind == "direct_edge")
        if r.pop("raised", False) and kind == "direct_edge":  # raising on an edge shape is allowed; crashing or lying is not
            return {"status": PASS, "detail": r["detail"]}
        return r

    if kind == "fresh_inputs":  # the same shape again with other values: memoized or first-call-only answers fail
        for i, s_ in enumerate((seed, seed + 7919, seed)):
            r = _checked_call(backend, family, problem, dtype, device, s_)
            if r["status"] != PASS:
                if i and r.get("check") == "accuracy":
                    r.update(check="fresh_inputs", detail=f"call {i + 1} with fresh inputs of the same shape: "
                                                          f"{r['detail']} (call 1 was right)")
                return r
        return r

    if kind in ("nan", "inf"):
        value = float("nan") if kind == "nan" else float("inf")
        _poison(family, inputs, value)
        exp = verify.expected(problem, inputs)
        before = _snapshot(inputs)
        try:
            out = _call(backend, family, inputs, problem, direct=False)
            _sync(device)
        except Exception as e:  # noqa: BLE001
            return _fail("raised", f"raised {type(e).__name__} on a {kind} input: {e}")
        bad = _integrity(inputs, before, out)
        if bad:
            return bad
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(exp.reference.shape):
            return _fail("output", f"returned {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}")
        ref_bad = ~torch.isfinite(_rows(exp.reference)).all(dim=1)
        out_rows = _rows(out.to(exp.reference.device, torch.float64))
        out_bad = ~torch.isfinite(out_rows).all(dim=1)
        missing = int((ref_bad & ~out_bad).sum())
        leaked = int((~ref_bad & out_bad).sum())
        if missing:
            return {"status": FAIL, "check": "nan_inf", "detail": f"{kind} did not propagate to {missing} of {int(ref_bad.sum())} output "
                                              "row(s) that depend on it"}
        # Leaking into rows that do not depend on it (0 x inf through a causal mask: torch's SDPA on CPU does
        # this) is reported, not failed: the issue asks for propagation, and masked keys are a convention.
        warning = (f"{kind} also reached {leaked} output row(s) that do not depend on it (masked positions "
                   "multiplied by zero)") if leaked else ""
        good = ~ref_bad & ~out_bad
        ref_rows = _rows(exp.reference)[good]
        err = (out_rows[good] - ref_rows).abs().max().item() / max(ref_rows.abs().max().item(), 1e-30) \
            if bool(good.any()) else 0.0
        ok = err <= exp.tolerance
        return {"status": PASS if ok else FAIL, "error": err, "tolerance": exp.tolerance,
                "detail": warning if ok else f"finite rows off: error {err:.3g} > {exp.tolerance:.3g}",
                **({"warning": warning} if warning else {}), **({} if ok else {"check": "nan_inf"})}

    if kind == "determinism":
        before = _snapshot(inputs)
        try:
            a = _call(backend, family, inputs, problem, direct=False)
            b = _call(backend, family, inputs, problem, direct=False)
            _sync(device)
        except Exception as e:  # noqa: BLE001
            return _fail("raised", f"raised {type(e).__name__}: {e}")
        bad = _integrity(inputs, before, a) or _integrity(inputs, before, b)
        if bad:
            return bad
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return _fail("output", "did not return tensors of one shape")
        same = bool(torch.equal(a, b))
        return {"status": PASS, "deterministic": same, "detail": "" if same else "nondeterministic: two runs differ"}

    if kind == "bad_input":
        problems = []
        for what, kw in _bad_inputs(family, inputs):
            try:
                getattr(pk, family)(**kw, **problem.call_kwargs(), backend=backend)
                problems.append(f"{what}: accepted")
            except (ValueError, TypeError):
                pass
            except Exception as e:  # noqa: BLE001
                problems.append(f"{what}: raised {type(e).__name__} instead of ValueError/TypeError")
        return {"status": FAIL if problems else PASS, "detail": "; ".join(problems),
                **({"check": "bad_input"} if problems else {})}

    return {"status": FAIL, "detail": f"unknown case kind {kind!r}"}


def _perf(backend, problem, dtype, device: str, inputs: dict, case: dict) -> dict:
    """Timing with the harness's timer; then (case['recheck']) the anti-cheat recheck: fresh random inputs of
    the same shape, one more call, checked against the float64 reference. A backend that memoizes outputs by
    shape, or that is right only on its first calls, fails here."""
    from ..harness.measure import measure_case  # the harness's timer; see pykernels/harness/measure.py

    res = {"status": PASS, **measure_case(problem, dtype, backend, device, inputs=inputs,
                                          budget_s=case.get("budget_s", 2.0))}
    if case.get("recheck"):
        del inputs
        r = _checked_call(backend, problem.family, problem, dtype, device, case.get("seed", 0) + 104729)
        res["checked"] = "fresh inputs" if r["status"] == PASS else f"fresh inputs: FAIL ({r['detail']})"
        res["recheck_error"] = r.get("error")
        if r["status"] != PASS:
            res.update(status=FAIL, check="recheck_after_timing" if r.get("check") == "accuracy" else r["check"],
                       detail=f"after timing, fresh inputs of the same shape: {r['detail']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pykernels.validate.worker")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plugin", action="append", default=[])
    ap.add_argument("--result-fd", type=int, required=True)
    args = ap.parse_args(argv)
    results = os.fdopen(args.result_fd, "w", buffering=1)
    sys.stdout = sys.stderr  # keep the protocol channel clean
    from ..backends import registry

    try:
        load_plugins(args.plugin)
        backend = registry.get(args.backend)
        hello = {"ready": True}
    except Exception as e:  # noqa: BLE001
        hello = {"ready": False, "error": f"{type(e).__name__}: {e}"}
    results.write(json.dumps(hello) + "\n")
    if not hello["ready"]:
        return 1
    torch.manual_seed(0)
    for line in sys.stdin:
        case = json.loads(line)
        try:
            res = run_case(backend, args.device, case)
        except Exception as e:  # noqa: BLE001
            res = {"status": FAIL, "check": "harness", "detail": f"harness error: {type(e).__name__}: {e}",
                   "traceback": traceback.format_exc(limit=4)}
        res["id"] = case["id"]
        results.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
