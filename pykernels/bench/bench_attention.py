"""attention benchmarks: every backend on every attention shape of the selected sweep (pykernels/harness/sweeps.py).

`pytest --benchmark --kernel attention` times them; plain `pytest` runs each smoke case once, untimed. The cases
are parametrized by the pykernels pytest plugin (pykernels/pytest_plugin.py) from --sweep, --backend
and --dtype; `kernel_bench` skips a backend that is unavailable or does not support a case, with the reason.
"""

import pytest


@pytest.mark.pykernels_bench("attention")
def bench_attention(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
