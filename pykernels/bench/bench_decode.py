"""decode benchmarks: every backend on every decode case of the selected sweep (see pykernels/bench/__init__.py)."""

import pytest


@pytest.mark.pykernels_bench("decode")
def bench_decode(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
