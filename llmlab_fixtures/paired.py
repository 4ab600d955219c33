"""Models compared item by item: which items two models both answered, and how often they agree."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Item = Mapping[str, Any]


def read_items(path: Path) -> list[dict[str, Any]]:
    """The records of an items.jsonl file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the items of one dataset that both scored without error."""

    dataset: str
    model_a: str
    model_b: str
    n: int  # items both models scored
    same_prediction: int  # items where both picked the same answer
    both_correct: int
    only_a: int  # a right, b wrong
    only_b: int  # b right, a wrong

    @property
    def agreement(self) -> float | None:
        return self.same_prediction / self.n if self.n else None


def compare_pairs(items: Iterable[Item], model_order: Sequence[str] = ()) -> list[PairedComparison]:
    """Every pair of models that scored the same items of a dataset, compared on those items only."""
    scored: dict[str, dict[str, dict[str, Item]]] = {}  # dataset -> model -> item_id -> item
    for item in items:
        if item.get("error") is None and item.get("correct") is not None:
            scored.setdefault(item["dataset"], {}).setdefault(item["model"], {})[str(item["item_id"])] = item
    rank = {model: i for i, model in enumerate(model_order)}
    comparisons = []
    for dataset in sorted(scored):
        models = sorted(scored[dataset], key=lambda m: (rank.get(m, len(rank)), m))
        for a, b in itertools.combinations(models, 2):
            shared = scored[dataset][a].keys() & scored[dataset][b].keys()
            if not shared:
                continue
            pairs = [(scored[dataset][a][i], scored[dataset][b][i]) for i in shared]
            comparisons.append(PairedComparison(
                dataset=dataset, model_a=a, model_b=b, n=len(pairs),
                same_prediction=sum(x["prediction"] == y["prediction"] for x, y in pairs),
                both_correct=sum(bool(x["correct"]) and bool(y["correct"]) for x, y in pairs),
                only_a=sum(bool(x["correct"]) and not y["correct"] for x, y in pairs),
                only_b=sum(bool(y["correct"]) and not x["correct"] for x, y in pairs),
            ))
    return comparisons
