"""Plain records that flow from the evaluator to the results writer and the merger."""

from __future__ import annotations

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
class TaskRun:
    """Everything one (model, dataset) evaluation produced."""

    model: str
    backend: str
    dataset: str
    scoring: str  # "loglik" or "generate"
    num_fewshot: int
    prompt_version: str
    metrics: list[MetricValue]
    items: list[ItemRecord]
    wall_s: float
