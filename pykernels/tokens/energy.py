"""Energy meters: NVIDIA board energy through NVML, CPU package energy through RAPL (powercap).

`meter_for(device)` gives a meter or the reason there is none; never a guessed figure. A meter's
`start()` / `stop()` bracket a measurement and `stop()` returns (joules, seconds), from which the
token report takes the average power while a kernel was being timed, and from that joules per token.

- CUDA: nvidia-ml-py (`import pynvml`, imported lazily). The board's cumulative energy counter
  (nvmlDeviceGetTotalEnergyConsumption, mJ, Volta and newer) when the board has one; otherwise board
  power sampled every 10 ms in a thread and integrated.
- CPU: /sys/class/powercap/intel-rapl:N/energy_uj of the package domains (AMD Zen exposes the same
  interface), summed, with the counter's wrap-around handled. Since Linux 5.10 these files are root-only
  (CVE-2020-8694), and VMs usually expose none: then "not available" with that reason.
Board / package energy includes everything else running on the device at the time: on a shared machine
the figure is an upper bound for the kernel.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
_SAMPLE_S = 0.010


class Meter:
    source = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> tuple[float, float]:
        """(joules, seconds) since start()."""
        raise NotImplementedError


class _CounterMeter(Meter):
    """A cumulative energy counter read before and after."""

    def _read(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._e0, self._t0 = self._read(), time.perf_counter()

    def stop(self) -> tuple[float, float]:
        e1, t1 = self._read(), time.perf_counter()
        return self._delta(self._e0, e1), t1 - self._t0

    def _delta(self, e0: float, e1: float) -> float:
        return e1 - e0


class RaplMeter(_CounterMeter):
    def __init__(self, domains: list[Path]):
        self.domains = domains
        self.ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.source = "RAPL " + "+".join((d / "name").read_text().strip() for d in domains)

    def _read_each(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def start(self) -> None:
        self._e0, self._t0 = self._read_each(), time.perf_counter()

    def stop(self) -> tuple[float, float]:
        e1, t1 = self._read_each(), time.perf_counter()
        uj = 0
        for a, b, rng in zip(self._e0, e1, self.ranges):
            uj += b - a if b >= a else b + rng - a  # the counter wrapped once
        return uj * 1e-6, t1 - self._t0


class NvmlEnergyMeter(_CounterMeter):
    def __init__(self, nvml, handle, name: str):
        self.nvml, self.handle = nvml, handle
        self.source = f"NVML total energy ({name})"

    def _read(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) * 1e-3


class NvmlPowerMeter(Meter):
    """Board power sampled in a thread every 10 ms and integrated (trapezoids)."""

    def __init__(self, nvml, handle, name: str):
        self.nvml, self.handle = nvml, handle
        self.source = f"NVML power samples every {_SAMPLE_S * 1e3:.0f} ms ({name})"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) * 1e-3))
            self._stop.wait(_SAMPLE_S)

    def start(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> tuple[float, float]:
        t1 = time.perf_counter()
        self._stop.set()
        self._thread.join()
        s = self._samples
        if len(s) < 2:
            return (s[0][1] if s else 0.0) * (t1 - self._t0), t1 - self._t0
        j = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(s))
        return j * (t1 - self._t0) / (s[-1][0] - s[0][0]), t1 - self._t0


def rapl_domains(root: Path = POWERCAP) -> tuple[list[Path], str | None]:
    """Readable RAPL package domains, or the reason there are none."""
    if not root.is_dir():
        return [], f"{root} does not exist (no powercap driver: typical of a VM)"
    pkgs = [
        d
        for d in sorted(root.glob("intel-rapl:*"))
        if d.name.count(":") == 1
        and (d / "name").is_file()
        and (d / "name").read_text().strip().startswith("package")
    ]
    if not pkgs:
        return [], f"{root} has no RAPL package domain"
    try:
        for d in pkgs:
            int((d / "energy_uj").read_text())
    except PermissionError:
        return [], (
            f"{pkgs[0] / 'energy_uj'} is not readable by this user (root-only since Linux 5.10, "
            "CVE-2020-8694)"
        )
    except (OSError, ValueError) as e:
        return [], f"cannot read {pkgs[0] / 'energy_uj'}: {e}"
    return pkgs, None


def _nvml_meter(index: int) -> tuple[Meter | None, str | None]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
    except Exception as e:  # noqa: BLE001 - NVML errors are their own exception classes
        return None, f"NVML could not open GPU {index}: {e}"
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return NvmlEnergyMeter(pynvml, h, name), None
    except Exception:  # noqa: BLE001, S110 - no energy counter on this GPU: fall back to power sampling
        pass
    try:
        pynvml.nvmlDeviceGetPowerUsage(h)
        return NvmlPowerMeter(pynvml, h, name), None
    except Exception as e:  # noqa: BLE001
        return None, f"NVML reads neither energy nor power on {name}: {e}"


def meter_for(device: str) -> tuple[Meter | None, str | None]:
    """(meter, None) where energy can be read for `device` ('cpu', 'cuda', 'cuda:1'), else (None, reason)."""
    kind, _, idx = str(device).partition(":")
    if kind == "cuda":
        # NVML numbers GPUs in PCI bus order; CUDA does too when CUDA_DEVICE_ORDER=PCI_BUS_ID (the usual
        # setting on multi-GPU hosts). With one GPU the two always agree.
        return _nvml_meter(int(idx) if idx else 0)
    if kind == "cpu":
        doms, reason = rapl_domains()
        if reason:
            return None, reason
        return RaplMeter(doms), None
    return None, f"no energy meter for device type {kind!r}"


__all__ = ["Meter", "NvmlEnergyMeter", "NvmlPowerMeter", "RaplMeter", "meter_for", "rapl_domains"]
