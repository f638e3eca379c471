"""decode benchmarks: every backend on every decode shape of the selected sweep (pykernels/harness/sweeps.py).

`pytest --benchmark --kernel decode` times them; plain `pytest` runs each smoke case once, untimed. The cases
are parametrized by the pykernels pytest plugin (pykernels/pytest_plugin.py) from --sweep, --backend
and --dtype; `kernel_bench` skips a backend that is unavailable or does not support a case, with the reason.
"""

import pytest


@pytest.mark.pykernels_bench("decode")
def bench_decode(kernel_case, kernel_bench):
    kernel_bench(kernel_case)
