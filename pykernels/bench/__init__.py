"""The benchmark sweeps, one file per family, shipped in the package so that an installed wheel runs them
from any directory: `pykernels bench`, or in a clone of the repository `pytest --benchmark` (the project's
pytest configuration loads the plugin). Each bench function only marks its family and hands the case to
`kernel_bench`: the pytest plugin (pykernels.pytest_plugin) parametrizes the cases from the sweep and the
--pk-sweep / --pk-backend / --pk-kernel / --pk-dtype filters, skips a backend that is unavailable or does not
support a case (with the reason), times the rest and checks every output against the float64 reference.
Without --benchmark each smoke case runs once, untimed."""
