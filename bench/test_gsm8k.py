"""GSM8K: grade-school math word problems, 5-shot greedy generation, strict and flexible answer extraction."""

import pytest


@pytest.mark.llmlab_dataset("gsm8k")
def test_gsm8k(run_task):
    summary = run_task("gsm8k")
    assert summary.n_items > 0, "no GSM8K item was scored"
    assert summary.n_errors == 0, f"{summary.n_errors} items failed; their errors are in items.jsonl"
