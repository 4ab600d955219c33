"""CPU cores shared between xdist workers that run in-process models.

Each such worker registers in the run's output directory while it holds a model. Threads per model are the
cores divided by the workers registered, so when one worker finishes its model the others take its cores
instead of leaving them idle; threads never add up to more than the cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def available_cores() -> int:
    """Physical cores within this process's CPU affinity."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreShare:
    """One worker's view of the workers holding in-process models: join on load, leave on close, and ask how
    many threads are this worker's now (checked at most every ``check_every`` seconds)."""

    def __init__(self, directory: Path, worker: str, cores: int | None = None, check_every: float = 2.0) -> None:
        self.directory = directory
        self.worker = worker
        self.cores = cores or available_cores()
        self.check_every = check_every
        self._checked = float("-inf")
        self._threads: int | None = None

    @property
    def _entry(self) -> Path:
        return self.directory / f"{self.worker}.pid"

    def join(self, threads: int) -> None:
        """Register this worker as running a model with ``threads`` threads."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entry.write_text(str(os.getpid()), encoding="utf-8")
        self._checked = float("-inf")
        self._threads = threads

    def leave(self) -> None:
        """This worker holds no model any more: its cores go to the others."""
        self._entry.unlink(missing_ok=True)

    def workers(self) -> int:
        """Workers holding a model now (a crashed worker's entry does not count)."""
        count = 0
        for entry in self.directory.glob("*.pid"):
            try:
                pid = int(entry.read_text(encoding="utf-8") or 0)
            except (OSError, ValueError):
                continue
            count += pid > 0 and _alive(pid)
        return max(1, count)

    def threads(self) -> int:
        """This worker's share of the cores."""
        return max(1, self.cores // self.workers())

    def changed_threads(self) -> int | None:
        """The new thread count when this worker's share changed since the last answer, else None (throttled)."""
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return None
        self._checked = now
        threads = self.threads()
        if threads == self._threads:
            return None
        self._threads = threads
        return threads
