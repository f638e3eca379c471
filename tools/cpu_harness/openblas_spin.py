"""Shows numpy's OpenBLAS pool stealing the cores from the next timed call (docs/harness.md):
native bf16 GEMM 2048^3 timed right after a numpy matmul, after a pause of 0 / 0.05 / 0.2 / 0.5 s.

    OPENBLAS_THREAD_TIMEOUT=20 python tools/cpu_harness/openblas_spin.py   # OpenBLAS's default-ish spin
    python tools/cpu_harness/openblas_spin.py                              # as pykernels sets it (4)

(`import pykernels` sets OPENBLAS_THREAD_TIMEOUT=4 only when it is unset; torch loads numpy, so the
variable must be set before `import torch` to take effect: run this script with it in the environment.)
"""
import os
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np
import torch

import pykernels as pk

torch.set_num_threads(2)
a = torch.randn(2048, 2048).bfloat16()
b = torch.randn(2048, 2048).bfloat16()
an = np.random.rand(2048, 2048).astype(np.float32)
f = pk.prepare("gemm", backend="native", a=a, b=b)
f()


def timed_ms() -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


for settle in (0, 0.05, 0.2, 0.5):
    r = []
    for _ in range(3):
        an @ an  # numpy (OpenBLAS) matmul, then the pause, then the timed native call
        time.sleep(settle)
        r.append(timed_ms())
    print(f"after numpy, pause {settle} s: native", [f"{x:.1f} ms" for x in r])
print("without numpy: native", [f"{timed_ms():.1f} ms" for _ in range(3)])
