"""The benchmark sweeps, one file per family, shipped in the package so that an installed wheel runs them
from any directory: `pykernels bench` (or `pytest -c <this dir>/bench.ini --rootdir <this dir> <this dir>
--pk-bench`). The cases come from pykernels.harness.sweeps; the pytest plugin (pykernels.pytest_plugin)
parametrizes and times them."""
