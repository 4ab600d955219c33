"""Controller side: gather TaskSummaries from test reports (local or from xdist workers) and order them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from llmlab_fixtures.eval.summary import TaskSummary
from llmlab_fixtures.reports.speed import SpeedFigure, speeds_from_properties

SUMMARY_PROPERTY = "llmlab_summary"


def summary_property(summary: TaskSummary) -> tuple[str, str]:
    """The user property that carries a summary to the controller (JSON text survives xdist serialisation)."""
    return SUMMARY_PROPERTY, json.dumps(summary.to_json())


def summaries_from_properties(properties: Iterable[tuple[str, Any]]) -> list[TaskSummary]:
    """The summaries carried by a report's user_properties."""
    return [TaskSummary.from_json(json.loads(value)) for key, value in properties if key == SUMMARY_PROPERTY]


def merge_summaries(summaries: Iterable[TaskSummary], model_order: Sequence[str] = ()) -> list[TaskSummary]:
    """One summary per (model, dataset), ordered by the requested model order then dataset name.

    The result does not depend on how the summaries were split between workers or the order they arrived in.
    """
    by_key: dict[tuple[str, str], TaskSummary] = {}
    for summary in summaries:
        by_key[(summary.model, summary.dataset)] = summary
    rank = {model: i for i, model in enumerate(model_order)}
    return sorted(by_key.values(), key=lambda s: (rank.get(s.model, len(rank)), s.model, s.dataset))


class ResultCollector:
    """Receives every test report on the controller and keeps the llmlab summaries."""

    def __init__(self) -> None:
        self.summaries: list[TaskSummary] = []
        self.speeds: list[SpeedFigure] = []

    def add_report(self, user_properties: Iterable[tuple[str, Any]]) -> None:
        properties = list(user_properties)
        self.summaries.extend(summaries_from_properties(properties))
        self.speeds.extend(speeds_from_properties(properties))

    def merged(self, model_order: Sequence[str]) -> list[TaskSummary]:
        return merge_summaries(self.summaries, model_order)
