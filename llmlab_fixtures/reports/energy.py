"""Energy meters: Linux RAPL counters, NVIDIA NVML, or an estimate from CPU time × a configured wattage.

``measure_energy`` wraps a block of work and says how many joules the CPU (and GPU) used and which meter said so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

POWERCAP_DIR = Path("/sys/class/powercap")


@dataclass
class EnergyReading:
    """Joules one block of work used, and where each figure came from."""

    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds (user + system) of the measured scope
    cpu_j: float | None = None
    cpu_source: str = "none"
    gpu_j: float | None = None
    gpu_source: str | None = None

    @property
    def total_j(self) -> float | None:
        if self.cpu_j is None and self.gpu_j is None:
            return None
        return (self.cpu_j or 0.0) + (self.gpu_j or 0.0)


class RaplMeter:
    """CPU package energy from the powercap ``intel-rapl:N/energy_uj`` counters (whole packages, all processes)."""

    def __init__(self, root: Path = POWERCAP_DIR) -> None:
        self.zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        self._start: list[int] = []

    @staticmethod
    def _read(path: Path) -> int:
        return int(path.read_text().strip())

    def available(self) -> bool:
        """Whether at least one package counter exists and can be read (often root-only)."""
        try:
            return bool(self.zones) and all(self._read(z / "energy_uj") >= 0 for z in self.zones)
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        self._start = [self._read(z / "energy_uj") for z in self.zones]

    def stop(self) -> float:
        """Joules since start(), allowing each counter to wrap once at ``max_energy_range_uj``."""
        total_uj = 0
        for zone, first in zip(self.zones, self._start):
            now = self._read(zone / "energy_uj")
            if now < first:
                now += self._read(zone / "max_energy_range_uj")
            total_uj += now - first
        return total_uj / 1e6


class NvmlMeter:
    """GPU energy through NVML (``nvidia-ml-py``): the total-energy counter, else power sampled at start and end."""

    def __init__(self) -> None:
        self.handles: list[object] = []
        self._nvml = None
        self._start: list[float] = []
        self._start_time = 0.0
        self.method = "counter"
        with contextlib.suppress(Exception):  # no package, no driver, no GPU: the meter is simply absent
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def available(self) -> bool:
        return bool(self.handles)

    def _counters(self) -> list[float]:
        return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0 for h in self.handles]  # mJ -> J

    def _power_w(self) -> list[float]:
        return [self._nvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for h in self.handles]  # mW -> W

    def start(self) -> None:
        self._start_time = time.perf_counter()
        try:
            self._start = self._counters()
        except Exception:  # counter unsupported (pre-Volta): average two power samples instead
            self.method = "power samples"
            self._start = self._power_w()

    def stop(self) -> float:
        if self.method == "counter":
            return sum(now - first for now, first in zip(self._counters(), self._start))
        elapsed = time.perf_counter() - self._start_time
        return sum((a + b) / 2 * elapsed for a, b in zip(self._start, self._power_w()))

    @property
    def source(self) -> str:
        return f"NVML {self.method} ({len(self.handles)} GPU{'s' if len(self.handles) != 1 else ''})"

    def close(self) -> None:
        """Release this meter's reference to NVML (nvmlInit and nvmlShutdown are reference counted)."""
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml, self.handles = None, []


def _cpu_seconds(scope: str) -> float:
    """User + system CPU seconds of this process (and its children), or of the whole machine."""
    import psutil

    if scope == "machine":
        times = psutil.cpu_times()
        return times.user + times.system + getattr(times, "nice", 0.0)
    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


@contextlib.contextmanager
def measure_energy(cpu_watts: float, *, scope: str = "process", powercap_dir: Path = POWERCAP_DIR,
                   use_nvml: bool = True) -> Iterator[EnergyReading]:
    """Measure the energy of the ``with`` block; the yielded reading is filled in when the block ends.

    CPU: RAPL when readable, else ``cpu_watts`` × CPU seconds ÷ logical cores (``cpu_watts`` is the draw of the
    whole CPU fully busy). ``scope`` is ``process`` (this process) or ``machine`` (every process: a model served
    by a loopback server burns its CPU in another process). GPU: NVML when installed and a GPU is present.
    """
    reading = EnergyReading()
    rapl = RaplMeter(powercap_dir)
    rapl_ok = rapl.available()
    nvml = NvmlMeter() if use_nvml else None
    if rapl_ok:
        rapl.start()
    if nvml is not None and nvml.available():
        nvml.start()
    cpu_start = _cpu_seconds(scope)
    started = time.perf_counter()
    try:
        yield reading
    finally:
        reading.wall_s = time.perf_counter() - started
        reading.cpu_s = max(0.0, _cpu_seconds(scope) - cpu_start)
        if rapl_ok:
            reading.cpu_j = rapl.stop()
            reading.cpu_source = f"RAPL {', '.join(z.name for z in rapl.zones)} (whole CPU package)"
        else:
            cores = os.cpu_count() or 1
            reading.cpu_j = cpu_watts * reading.cpu_s / cores
            who = "this process" if scope == "process" else "all processes"
            reading.cpu_source = (f"estimate: {cpu_watts:g} W × CPU time of {who} ({reading.cpu_s:.1f} s) "
                                  f"÷ {cores} cores")
        if nvml is not None and nvml.available():
            reading.gpu_j = nvml.stop()
            reading.gpu_source = nvml.source
        if nvml is not None:
            nvml.close()
