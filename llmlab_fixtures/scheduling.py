"""xdist scheduling that keeps every test of one model on one worker, so each model loads once per run.

xdist's own ``--dist loadgroup`` marks groups by rewriting node ids on the workers, which pytest >= 9.2 no
longer honours (pytest-dev/pytest-xdist#1386); this scheduler finds the model in the node id instead.
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
