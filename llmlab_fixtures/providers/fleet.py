"""One model served by several servers (a fleet): requests spread over them, ``--concurrency`` in flight per server,
and a server that fails taken out of rotation while its requests go to the others.

A fleet is one model in every table: the same label, items and checkpoint. Each member is the backend's own
provider for one base URL (with its own retries); the fleet only chooses a member for each request and, when a
member fails for good with a connection, timeout or server error, retires it and sends the request elsewhere.
Errors that another server would repeat (a rejected request, a bad key) are not retried.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)
from llmlab_fixtures.providers.cloud import ApiRequestFailed, host_of
from llmlab_fixtures.run.network import data_location

T = TypeVar("T")
FAILOVER_KINDS = ("connection", "timeout")


def fails_over(exc: ApiRequestFailed) -> bool:
    """Whether another server may succeed where this one failed: it is down, slow or erring on its side."""
    return exc.kind in FAILOVER_KINDS or (exc.status is not None and exc.status >= 500)


class Fleet(Provider):
    """Several providers of one model behind one Provider; thread-safe, like its members."""

    def __init__(self, members: Sequence[Any], label: str) -> None:
        if not members:
            raise ValueError("a fleet needs at least one member")
        self.members = list(members)
        self.label = label
        self.backend = str(members[0].backend)
        self.per_member = max(1, int(members[0].max_concurrency))
        self.max_concurrency = self.per_member * len(self.members)
        self.in_flight = [0] * len(self.members)
        self.served = [0] * len(self.members)
        self.retired: dict[int, str] = {}
        self._ready = threading.Condition()

    # choosing a member --------------------------------------------------------------------------------

    def _acquire(self) -> int:
        """The healthy member with the fewest requests in flight (waiting while all are full)."""
        with self._ready:
            while True:
                healthy = [i for i in range(len(self.members)) if i not in self.retired]
                if not healthy:
                    raise LlmlabError(f"model {self.label}: every server of the fleet failed: "
                                      + "; ".join(f"{self._url(i)}: {why}" for i, why in self.retired.items()))
                free = [i for i in healthy if self.in_flight[i] < self.per_member]
                if free:
                    chosen = min(free, key=lambda i: (self.in_flight[i], self.served[i]))
                    self.in_flight[chosen] += 1
                    return chosen
                self._ready.wait()

    def _release(self, index: int, served: bool) -> None:
        with self._ready:
            self.in_flight[index] -= 1
            self.served[index] += int(served)
            self._ready.notify_all()

    def _retire(self, index: int, exc: ApiRequestFailed) -> None:
        with self._ready:
            if index in self.retired:
                return
            self.retired[index] = str(exc)
            self._ready.notify_all()
        warnings.warn(f"{self.label}: {self._url(index)} taken out of rotation ({exc}); its requests go to the "
                      "other servers", RuntimeWarning, stacklevel=2)

    def _url(self, index: int) -> str:
        return str(getattr(self.members[index], "base_url", index))

    def _call(self, request: Callable[[Any], T]) -> T:
        """``request(member)`` on a chosen member; on a failure another server may not repeat, the next one."""
        while True:
            index = self._acquire()
            served = False
            try:
                result = request(self.members[index])
                served = True
                return result
            except ApiRequestFailed as exc:
                if not fails_over(exc):
                    raise
                self._retire(index, exc)
            finally:
                self._release(index, served)

    # Provider -----------------------------------------------------------------------------------------

    @property
    def supports_loglikelihood(self) -> bool:  # type: ignore[override]
        return all(member.supports_loglikelihood for member in self.members)

    def initialize(self) -> None:
        for member in self.members:
            member.initialize()

    def close(self) -> None:
        for member in self.members:
            member.close()

    def estimate_memory(self) -> int:
        return 0

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._call(lambda member: member.generate(request))

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Each request on its own member, so ``--concurrency`` bounds the requests in flight per server."""
        def one(request: LoglikelihoodRequest) -> LoglikelihoodResult:
            return self._call(lambda member: member.loglikelihood([request]))[0]

        if len(requests) <= 1:
            return [one(request) for request in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))

    def get_model_info(self) -> ModelInfo:
        info = self.members[0].get_model_info()
        urls = [self._url(i) for i in range(len(self.members))]
        places = [data_location(url) for url in urls]
        kind = "cloud" if any(p.startswith("cloud") for p in places) else "loopback"
        location = f"{kind} {', '.join(p.split(' ', 1)[1] for p in places)}"
        extra = {**info.extra, "fleet": [host_of(u) for u in urls],
                 "served": {host_of(self._url(i)): n for i, n in enumerate(self.served)},
                 "retired": {host_of(self._url(i)): why for i, why in self.retired.items()}}
        return ModelInfo(name=info.name, backend=info.backend, data_location=location, extra=extra)
