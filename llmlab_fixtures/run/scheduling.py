"""xdist scheduling that keeps every test of one model on one worker, so each model loads once per run.

xdist's own ``--dist loadgroup`` marks groups by rewriting node ids on the workers, which pytest >= 9.2 no
longer honours (pytest-dev/pytest-xdist#1386); this scheduler finds the model in the node id instead.

It also survives a crashed worker, which xdist 3.8's scope scheduling does not (pytest-dev/pytest-xdist#1323,
#1327, #1378): only unfinished work goes back on the queue, the test the worker died on is not run again (xdist
has already reported it as failed), and a worker that receives the last unit is told that nothing more will come.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xdist.scheduler import LoadGroupScheduling


def model_scope(nodeid: str, labels: Sequence[str]) -> str | None:
    """The model label inside a bench test's parameter id, e.g. ``test_arc[llama-cpp:smollm2-135m-arc_easy]``."""
    start = nodeid.find("[")
    if start < 0:
        return None
    params = nodeid[start + 1 : nodeid.rfind("]")]
    for label in sorted(labels, key=len, reverse=True):
        if params == label or params.startswith(f"{label}-") or params.endswith(f"-{label}") or f"-{label}-" in params:
            return label
    return None


class ModelScheduling(LoadGroupScheduling):
    """Like ``--dist loadgroup``, with one work unit per model."""

    def __init__(self, config: Any, log: Any = None, *, labels: Sequence[str] = ()) -> None:
        super().__init__(config, log)
        self.labels = tuple(labels)

    def _split_scope(self, nodeid: str) -> str:
        label = model_scope(nodeid, self.labels)
        return f"llmlab-model:{label}" if label else super()._split_scope(nodeid)

    def remove_node(self, node: Any) -> str | None:
        """Forget ``node``; if it crashed, requeue its unfinished units and return the test it died on."""
        workload = self.assigned_work.pop(node)
        unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
        if not unfinished:
            return None
        first_unit = next(iter(unfinished.values()))  # a worker runs its units, and their tests, in order
        crashed = next(nodeid for nodeid, done in first_unit.items() if not done)
        first_unit[crashed] = True
        for scope, unit in unfinished.items():
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _assign_work_unit(self, node: Any) -> None:
        """Send the next unit that still has tests to run; when the queue is then empty, say so."""
        if node not in self.registered_collections:  # a replacement worker whose collection differed (xdist logged it)
            node.shutdown()
            return
        while self.workqueue:
            scope, unit = next(iter(self.workqueue.items()))
            if not all(unit.values()):
                break
            self.workqueue.pop(scope)  # nothing left to run in it
        else:
            node.shutdown()
            return
        super()._assign_work_unit(node)
        if not self.workqueue and not node.shutting_down:
            node.shutdown()  # a worker holding back its last test waits for this before running it
