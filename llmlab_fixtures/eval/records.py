"""Plain records that flow from the evaluator to the results writer and the merger."""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ItemRecord:
    """One (model, dataset, item) outcome; a line of items.jsonl."""

    model: str
    backend: str
    dataset: str
    item_id: str
    prediction: Any
    gold: Any
    correct: bool | None
    metrics: dict[str, float] = field(default_factory=dict)
    loglikelihoods: list[float] | None = None  # log-likelihood scoring
    response: str | None = None  # generation scoring
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evaluated_tokens: int = 0
    group: str | None = None  # e.g. the MMLU subject
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class MetricValue:
    """An aggregated metric with its standard error (lm-evaluation-harness conventions)."""

    name: str
    value: float
    stderr: float | None
    ci95: tuple[float, float] | None = None  # Wilson score interval, for metrics that are 0 or 1 per item


@dataclass
class ItemTotals:
    """Counts, token sums and timings of a run's items, kept as they arrive. Only the two timing columns grow
    with the run (8 bytes an item, for the latency percentiles); the records themselves are streamed to disk."""

    n_scored: int = 0
    n_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evaluated_tokens: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))  # scored items, seconds
    ttfts: array[float] = field(default_factory=lambda: array("d"))  # scored items that measured one

    def add(self, item: ItemRecord) -> None:
        """Count one finished item; failed items only count as errors."""
        if item.error is not None:
            self.n_errors += 1
            return
        self.n_scored += 1
        self.prompt_tokens += item.prompt_tokens
        self.completion_tokens += item.completion_tokens
        self.evaluated_tokens += item.evaluated_tokens
        self.latencies.append(item.latency_s)
        if item.ttft_s is not None:
            self.ttfts.append(item.ttft_s)

    @classmethod
    def of(cls, items: list[ItemRecord]) -> ItemTotals:
        totals = cls()
        for item in items:
            totals.add(item)
        return totals


@dataclass
class TaskRun:
    """Everything one (model, dataset) evaluation produced. ``items`` is empty when the records were only
    streamed (long runs); ``totals`` always covers every item."""

    model: str
    backend: str
    dataset: str
    scoring: str  # "loglik" or "generate"
    num_fewshot: int
    prompt_version: str
    metrics: list[MetricValue]
    items: list[ItemRecord]
    wall_s: float
    totals: ItemTotals | None = None

    def __post_init__(self) -> None:
        if self.totals is None:
            self.totals = ItemTotals.of(self.items)
