"""The conformance matrix as pytest tests: `pytest --pyargs pykernels.validate.test_conformance`.

Backend and device come from PYKERNELS_VALIDATE_BACKEND (default: native) and PYKERNELS_VALIDATE_DEVICE
(default: cpu). Cases run in the pytest process, so a crash ends the session: for a port that may crash,
use `pykernels validate`, which runs every case in a restartable worker process.
"""

from __future__ import annotations

import os

import pytest

from .cases import case_id, correctness_cases, parameter_cases, robustness_cases
from .worker import FAIL, UNSUPPORTED, run_case

BACKEND = os.environ.get("PYKERNELS_VALIDATE_BACKEND", "native")
DEVICE = os.environ.get("PYKERNELS_VALIDATE_DEVICE", "cpu")
CASES = correctness_cases() + parameter_cases() + robustness_cases()


@pytest.fixture(scope="module")
def backend():
    from ..backends import registry

    return registry.get(BACKEND)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conformance(backend, case):
    res = run_case(backend, DEVICE, dict(case, seed=CASES.index(case)))
    if res["status"] == UNSUPPORTED:
        pytest.skip(res["detail"])
    assert res["status"] != FAIL, res.get("detail")
