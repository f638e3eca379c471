"""pytest plugin for tests/test_fleet.py, loaded into a fleet device's sweep (`-p fleet_faults`): a backend that
crashes the sweep process (SIGSEGV) on one gemm shape and hangs on another, right on the rest."""

import ctypes
import time

import torch

from pykernels.backends.torch_ops import TorchBackend


class FaultyBackend(TorchBackend):
    name = "fleet_faulty"
    tier = "abstraction"
    dtypes = {("cpu", "gemm"): (torch.float32,)}

    def gemm(self, a, b):
        if a.shape[0] == 33:
            ctypes.string_at(0)  # reads address 0: SIGSEGV, the whole sweep process dies
        if a.shape[0] == 127:
            time.sleep(3600)
        return torch.matmul(a, b)


def pytest_configure(config):
    from pykernels.backends import registry

    registry.register(FaultyBackend(), source="test", replace=True)
