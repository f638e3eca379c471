"""gemm benchmarks: every backend on every gemm case of the selected sweep (see pykernels/bench/__init__.py)."""

import pytest


@pytest.mark.pykernels_bench("gemm")
def bench_gemm(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
