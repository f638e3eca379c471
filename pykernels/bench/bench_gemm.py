"""gemm benchmarks: every backend on every gemm shape of the selected sweep (pykernels/harness/sweeps.py).

`pytest --benchmark --kernel gemm` times them; plain `pytest` runs each smoke case once, untimed. The cases
are parametrized by the pykernels pytest plugin (pykernels/pytest_plugin.py) from --sweep, --backend
and --dtype; `kernel_bench` skips a backend that is unavailable or does not support a case, with the reason.
"""

import pytest


@pytest.mark.pykernels_bench("gemm")
def bench_gemm(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
