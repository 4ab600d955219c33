"""Models compared item by item: which items two models both answered, and how often they agree."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
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

    @property
    def mcnemar_p(self) -> float:
        """Exact McNemar p-value of the accuracy difference (two-sided, on the discordant items)."""
        return mcnemar_exact_p(self.only_a, self.only_b)

    @property
    def significant(self) -> bool:
        return self.mcnemar_p < SIGNIFICANCE_LEVEL

    @property
    def verdict(self) -> str:
        """A real difference, or one that could be noise, at the 5% level."""
        if not self.significant:
            return "no significant difference (could be noise)"
        better = self.model_a if self.only_a > self.only_b else self.model_b
        return f"{better} is better (p < {SIGNIFICANCE_LEVEL:g})"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": self.agreement, "mcnemar_p": self.mcnemar_p,
                "significant": self.significant, "verdict": self.verdict}


SIGNIFICANCE_LEVEL = 0.05
OVERALL = "(all)"


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial test of ``only_a`` successes in ``only_a + only_b`` fair coin flips.

    Under the null hypothesis (same accuracy) each discordant item is equally likely to favour either model.
    The p-value doubles the smaller tail, capped at 1; no discordant items gives 1.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


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


def compare_pairs_overall(items: Iterable[Item], model_order: Sequence[str] = ()) -> list[PairedComparison]:
    """Every pair of models on all the items both scored, pooled over datasets (dataset ``(all)``)."""
    pooled = [{**item, "dataset": OVERALL, "item_id": f"{item['dataset']}/{item['item_id']}"} for item in items]
    return compare_pairs(pooled, model_order)
