"""attention benchmarks: every backend on every attention case of the selected sweep (see pykernels/bench/__init__.py)."""

import pytest


@pytest.mark.pykernels_bench("attention")
def bench_attention(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
