"""pykernels' own Triton kernels, one module per family (gemm.py, attention.py, decode.py).

Two instances of every family module exist in a process, built from the same source file:

* the compiled instance, the ordinary module ``pykernels.triton.<family>``: its ``@triton.jit`` objects
  are ``JITFunction``s that compile for the GPU (backend ``triton``);
* the interpreted instance, a private second import of the same file under the name
  ``pykernels.triton._interpreted_<family>``: its ``@triton.jit`` objects are Triton interpreter
  ``InterpretedFunction``s that run on CPU tensors (backend ``triton_interpret``, correctness only).

Why two imports: Triton (3.6 on the GPU machines, 3.9 here) chooses between compiling and interpreting
when ``triton.jit`` *decorates* a function: ``jit()`` reads ``triton.knobs.runtime.interpret``, which
reads the ``TRITON_INTERPRET`` environment variable at that moment, unless a program set the knob
explicitly. Nothing reads it again at call time except the autotuner's disk cache switch (read in
``Autotuner.__init__``, also at decoration). So ``_mode(interpret)`` sets the variable (and clears any
explicit knob) only while a family module is being executed, and restores both afterwards: decorations
made anywhere else in the process keep the user's setting. While an interpreted kernel runs, the
interpreter patches ``triton.language`` builtins and restores them when the launch ends (Triton >= 3.6,
``_LangPatchScope``); launches of interpreted kernels are serialized by ``INTERPRETER_LOCK``.

Rules for the family modules that make this work:
* family modules never import each other (an import inside the interpreted block would decorate the other
  module's kernels in interpreter mode), and no ``@triton.jit`` helper is shared between them: a kernel
  calls only helpers defined in its own module, so the interpreted instance calls interpreted helpers
  (globals resolve in its own namespace);
* the kernels call Triton builtins only, never Triton's standard library functions written in Triton
  (``tl.zeros``, ``tl.cdiv``, ``tl.max``, ``tl.sum``, ...): those are ``@jit`` functions decorated once,
  when ``triton.language`` is imported, so in a process that is not interpreting they are compiled
  ``JITFunction``s, and an interpreted kernel cannot call them ("Cannot call @triton.jit'd outside of the
  scope of a kernel"). Hence ``tl.full`` for zeros, integer arithmetic for ceil-division, and
  ``tl.reduce`` with Triton's own combine functions for max and sum;
* anything that depends on the mode (autotune configuration lists, the bf16 upcast flag) is decided from
  ``interpreting()`` at import time, i.e. from the mode the module was imported in.

Importing this package does not import triton; ``load()`` does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading

FAMILIES = ("gemm", "attention", "decode")
# Passed as `enable_fp_fusion` at every launch: FMA contraction on, as Triton's default has always been.
# Said explicitly because Triton 3.9 warns (an error under pytest's -W error) when it is left to the
# default, which changes in 3.10.
FP_FUSION = True
_ENV = "TRITON_INTERPRET"

_lock = threading.RLock()
_instances: dict[tuple[str, bool], object] = {}
# The interpreter patches triton.language globally for the duration of a launch: one launch at a time.
INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def _mode(interpret: bool):
    """Make ``triton.jit`` decorations inside this block compiled (False) or interpreted (True), and put
    the environment variable and Triton's knob back exactly as they were afterwards."""
    # Lazily (a missing triton must not break `import pykernels`), and before the variable changes: the
    # first import of triton.language decorates Triton's own @jit library functions, in the mode of the
    # moment, for the whole process.
    import triton
    import triton.language

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    # An explicit `triton.knobs.runtime.interpret = ...` lives in the instance __dict__ and wins over the
    # environment variable; lift it out for the block and restore it afterwards.
    explicit = runtime.__dict__.pop("interpret", None) if runtime is not None else None
    had_env = _ENV in os.environ
    old_env = os.environ.get(_ENV)
    os.environ[_ENV] = "1" if interpret else "0"
    try:
        yield
    finally:
        if had_env:
            os.environ[_ENV] = old_env
        else:
            os.environ.pop(_ENV, None)
        if explicit is not None:
            runtime.__dict__["interpret"] = explicit


def interpreting() -> bool:
    """True while a family module is being imported as the interpreted instance (called at module level)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get(_ENV, "0").lower() in ("1", "true", "on", "yes")  # pragma: no cover - old triton


def is_interpreted(kernel) -> bool:
    """Whether a (possibly autotuned / heuristics-wrapped) Triton kernel runs in the interpreter."""
    fn = kernel
    for _ in range(8):
        kind = type(fn).__name__
        if kind == "InterpretedFunction":
            return True
        if kind == "JITFunction":
            return False
        fn = getattr(fn, "fn", None)
        if fn is None:
            break
    raise TypeError(f"{kernel!r} is not a Triton kernel")


def _import_copy(family: str, interpret: bool):
    """A fresh, private instance of pykernels/triton/<family>.py decorated in the given mode."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    path = os.path.join(os.path.dirname(__file__), f"{family}.py")
    name = f"{__name__}._{'interpreted' if interpret else 'compiled'}_{family}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _lock, _mode(interpret):
        sys.modules[name] = module  # inspect.getsource (used by triton.jit) looks modules up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return module


def load(family: str, *, interpret: bool):
    """The compiled (``interpret=False``) or interpreted instance of a family's kernel module."""
    key = (family, interpret)
    with _lock:
        mod = _instances.get(key)
        if mod is not None:
            return mod
        if interpret:
            mod = _import_copy(family, True)
        else:
            name = f"{__name__}.{family}"
            if family not in FAMILIES:
                raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
            if name in sys.modules:
                mod = sys.modules[name]
            else:
                with _mode(False):
                    mod = importlib.import_module(name)
            if is_interpreted(mod.KERNELS[0]):
                # Someone imported the module directly with TRITON_INTERPRET=1 in the environment: do not
                # hand interpreter kernels to the GPU backend; build a compiled copy instead.
                mod = _import_copy(family, False)
        _instances[key] = mod
        return mod
