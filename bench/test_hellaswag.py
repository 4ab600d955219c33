"""HellaSwag: commonsense sentence completion, with lm-eval's preprocessing of the contexts and endings."""

import pytest


@pytest.mark.llmlab_dataset("hellaswag")
def test_hellaswag(run_task):
    summary = run_task("hellaswag")
    assert summary.n_items > 0, "no HellaSwag item was scored"
    assert summary.n_errors == 0, f"{summary.n_errors} items failed; their errors are in items.jsonl"
