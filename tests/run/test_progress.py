"""Progress lines: item weights from the real data mirror and the weighted ETA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.run.progress import ProgressEstimate, item_weight
from llmlab_fixtures.tasks import get_task


def test_long_mmlu_subjects_weigh_more(data_dir: Path) -> None:
    """A professional-law question outweighs a high-school-mathematics one, as its prompt does."""
    task = get_task("mmlu")
    docs = load_docs(task, data_dir)
    mean = {subject: sum(w := [item_weight(task, d, "loglik") for d in docs if d["subject"] == subject]) / len(w)
            for subject in ("professional_law", "high_school_mathematics")}
    assert mean["professional_law"] > 3 * mean["high_school_mathematics"]


def test_weight_counts_the_text_the_model_reads(data_dir: Path) -> None:
    task = get_task("arc_challenge")
    doc = load_docs(task, data_dir)[0]
    text, choices = task.text(doc), task.choices(doc)
    assert item_weight(task, doc, "loglik") == len(text) + sum(map(len, choices))  # each choice is scored
    assert item_weight(task, doc, "generate") == len(text)  # generation reads the prompt once
    assert item_weight(task, {"id": "broken"}, "loglik") == 1  # fails later, in the evaluator, with its own error


def test_eta_is_time_per_unit_of_work_times_work_left() -> None:
    estimate = ProgressEstimate([30, 10, 10, 10])
    assert estimate.total == 4
    assert math.isnan(estimate.eta(0, 0.0))
    assert estimate.eta(1, 3.0) == pytest.approx(3.0)  # the average item rate would say 9 s
    assert estimate.eta(3, 5.0) == pytest.approx(1.0)
    assert estimate.eta(4, 6.0) == 0.0
    assert estimate.line("m arc_challenge", 1, 3.0) == "[llmlab] m arc_challenge: 1/4 items, 0.33 it/s, ETA 3s"


def test_items_from_the_checkpoint_cost_nothing() -> None:
    """Resumed items neither speed up the rate nor shorten the ETA."""
    estimate = ProgressEstimate([10] * 10)
    assert math.isnan(estimate.eta(4, 0.01, resumed=4))
    assert estimate.line("m mmlu", 4, 0.01, resumed=4) == \
        "[llmlab] m mmlu: 4/10 items (4 from the checkpoint), 0.00 it/s, ETA ?"
    assert estimate.eta(6, 2.0, resumed=4) == pytest.approx(4.0)  # 2 items scored in 2 s, 4 left
    assert estimate.line("m mmlu", 6, 2.0, resumed=4).endswith("6/10 items (4 from the checkpoint), 1.00 it/s, ETA 4s")
