"""Progress of a long run: items done, their rate, and an ETA weighted by the work still to come.

Items differ tenfold in length within one dataset (MMLU's professional law against its one-line questions), so an
ETA from the average item rate swings with whatever subject is running. Weighting each item by the characters the
model reads for it (its question, plus its choices when they are scored one by one; shared few-shot blocks are
cached and left out) keeps the estimate steady: time so far × work left ÷ work done.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.tasks.definitions import TaskDefinition


def item_weight(task: TaskDefinition, doc: Mapping[str, Any], scoring: str) -> int:
    """Characters the model reads for ``doc`` beyond the blocks it shares with other items (at least 1).

    ``scoring`` is the effective mode ("loglik" or "generate"); a document too malformed to render weighs 1 (the
    evaluator records its error when it gets there).
    """
    try:
        text = task.text(doc)
        choices = task.choices(doc) if scoring == "loglik" and task.is_multiple_choice else []
    except (LlmlabError, LookupError, TypeError, ValueError):
        return 1
    return max(1, len(text) + sum(len(choice) for choice in choices))


class ProgressEstimate:
    """Turns items done and seconds elapsed into a progress line, given every item's weight in run order."""

    def __init__(self, weights: Sequence[int]) -> None:
        self._done_weight = [0, *accumulate(weights)]  # weight of the first i items

    @property
    def total(self) -> int:
        return len(self._done_weight) - 1

    def eta(self, done: int, elapsed: float, resumed: int = 0) -> float:
        """Seconds left: ``elapsed`` × weight left ÷ weight scored (NaN before the first scored item).

        ``resumed`` items came from the checkpoint at no cost; they are the first ones (an interrupted run's).
        """
        done = min(done, self.total)
        scored_weight = self._done_weight[done] - self._done_weight[min(resumed, done)]
        if scored_weight <= 0 or elapsed <= 0:
            return math.nan
        return elapsed * (self._done_weight[-1] - self._done_weight[done]) / scored_weight

    def line(self, label: str, done: int, elapsed: float, resumed: int = 0) -> str:
        """``label: done/total items, rate it/s, ETA s``; the rate is the average over the items scored so far."""
        rate = (done - resumed) / elapsed if elapsed > 0 else 0.0
        eta = self.eta(done, elapsed, resumed)
        from_checkpoint = f" ({resumed} from the checkpoint)" if resumed else ""
        left = "?" if math.isnan(eta) else f"{eta:.0f}s"
        return f"[llmlab] {label}: {done}/{self.total} items{from_checkpoint}, {rate:.2f} it/s, ETA {left}"
