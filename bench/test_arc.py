"""ARC (AI2 Reasoning Challenge): grade-school science questions, scored like lm-eval's arc_challenge/arc_easy."""

import pytest


@pytest.mark.llmlab_dataset("arc")
@pytest.mark.parametrize("task", ["arc_challenge", "arc_easy"])
def test_arc(task, run_task):
    summary = run_task(task)
    assert summary.n_items > 0, "no ARC item was scored"
    assert summary.n_errors == 0, f"{summary.n_errors} items failed; their errors are in items.jsonl"
