"""Controller side: every merge of worker results happens here. Summaries arrive in test reports (local or from
xdist workers); items and unload records arrive as part files the workers left in the results directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llmlab_fixtures.eval.summary import TaskSummary
from llmlab_fixtures.reports.results_dir import PARTS_DIR, atomic_write_text, unload_path
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


def merge_unloads(summaries: Sequence[TaskSummary], output_dir: Path) -> None:
    """Add each load's unload record (left by the worker that closed it) to the summaries' load info."""
    for summary in summaries:
        if summary.load and (path := unload_path(output_dir, summary.load.get("load_id", ""))).is_file():
            summary.load.update(json.loads(path.read_text(encoding="utf-8")))


def merge_items(output_dir: Path, summaries: Sequence[TaskSummary]) -> Path:
    """Concatenate the workers' item part files into items.jsonl, in summary order."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / "items.jsonl"
    chunks = []
    for summary in summaries:
        if summary.items_file and (output_dir / summary.items_file).is_file():
            chunks.append((output_dir / summary.items_file).read_text(encoding="utf-8"))
    atomic_write_text(target, "".join(chunks))
    return target


def remove_parts(output_dir: Path) -> None:
    """Drop the per-worker part files once items.jsonl and the summaries hold them."""
    shutil.rmtree(output_dir / PARTS_DIR, ignore_errors=True)
