"""Item-by-item comparison of models: only shared, error-free items count."""

from __future__ import annotations

from llmlab_fixtures.reports.paired import compare_pairs
from llmlab_fixtures.reports.table import agreement_table


def item(model: str, item_id: str, prediction: int, correct: bool, dataset: str = "arc_easy",
         error: str | None = None) -> dict:
    return {"model": model, "dataset": dataset, "item_id": item_id, "prediction": prediction,
            "correct": None if error else correct, "error": error}


def test_counts_agreement_and_who_was_right_on_shared_items() -> None:
    items = [
        item("a", "1", 0, True), item("b", "1", 0, True),  # same, both right
        item("a", "2", 1, False), item("b", "2", 2, True),  # only b
        item("a", "3", 3, True), item("b", "3", 1, False),  # only a
        item("a", "4", 2, False), item("b", "4", 2, False),  # same, both wrong
        item("a", "5", 0, True),  # b never scored it
        item("a", "6", 0, True), item("b", "6", 0, False, error="TimeoutError: ..."),  # b failed: not compared
        item("a", "1", 0, True, dataset="mmlu"), item("c", "1", 1, False, dataset="mmlu"),
    ]
    arc, mmlu = compare_pairs(items, ["b", "a", "c"])
    assert (arc.dataset, arc.model_a, arc.model_b) == ("arc_easy", "b", "a")  # requested order
    assert (arc.n, arc.same_prediction, arc.both_correct, arc.only_a, arc.only_b) == (4, 2, 1, 1, 1)
    assert arc.agreement == 0.5
    assert (mmlu.model_a, mmlu.model_b, mmlu.n, mmlu.same_prediction, mmlu.only_a) == ("a", "c", 1, 0, 1)
    lines = agreement_table([arc, mmlu])
    assert lines[0].split() == ["dataset", "model", "A", "model", "B", "n", "same", "prediction", "both", "right",
                                "only", "A", "right", "only", "B", "right"]
    assert lines[2].split() == ["arc_easy", "b", "a", "4", "2", "(50%)", "1", "1", "1"]


def test_a_single_model_has_nothing_to_compare() -> None:
    assert compare_pairs([item("a", "1", 0, True), item("a", "2", 1, False)]) == []
