"""TruthfulQA multiple choice: mc1 (single true answer) and mc2 (probability mass on the true answers)."""

import pytest


@pytest.mark.llmlab_dataset("truthfulqa")
@pytest.mark.parametrize("task", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa(task, run_task):
    summary = run_task(task)
    assert summary.n_items > 0, "no TruthfulQA item was scored"
    assert summary.n_errors == 0, f"{summary.n_errors} items failed; their errors are in items.jsonl"
