"""MMLU: 57 subjects of multiple-choice knowledge questions, letter continuations " A".." D"."""

import pytest


@pytest.mark.llmlab_dataset("mmlu")
def test_mmlu(run_task):
    summary = run_task("mmlu")
    assert summary.n_items > 0, "no MMLU item was scored"
    assert summary.n_errors == 0, f"{summary.n_errors} items failed; their errors are in items.jsonl"
