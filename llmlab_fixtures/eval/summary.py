"""Turn one TaskRun into the figures a test records: accuracy with stderr, latency, tokens, speed, memory."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llmlab_fixtures.eval.records import ItemTotals, TaskRun

SUMMARY_COLUMNS = (
    "model", "backend", "dataset", "metric", "value", "stderr", "ci95_low", "ci95_high", "n_items", "n_errors",
    "scoring", "num_fewshot",
    "prompt_version", "wall_s", "items_per_s", "tokens_per_s", "evaluated_tokens_per_s", "latency_p50_s",
    "latency_p95_s", "ttft_p50_s", "prompt_tokens", "completion_tokens", "evaluated_tokens", "peak_rss_mb",
    "data_location", "energy_cpu_j", "energy_gpu_j", "energy_source",
    # filled in by the results writer (cost.py): cost of this (model, dataset) and how it was made
    "cost_usd", "cost_per_1k_tokens", "cost_per_1k_items", "cost_note", "pareto_front",
)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class TaskSummary:
    """The merged unit: one (model, dataset) result, as recorded by a test and merged by the controller."""

    model: str
    backend: str
    dataset: str
    scoring: str
    num_fewshot: int
    prompt_version: str
    n_items: int
    n_errors: int
    metrics: dict[str, dict[str, float | None]]  # name -> {"value", "stderr", "ci95_low", "ci95_high"}
    wall_s: float
    items_per_s: float | None
    tokens_per_s: float | None
    evaluated_tokens_per_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None
    prompt_tokens: int
    completion_tokens: int
    evaluated_tokens: int
    peak_rss_mb: float
    data_location: str = "in-process"
    primary_metric: str | None = None  # the metric the comparison table shows
    model_info: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)  # which worker/process loaded the model, and how long it took
    items_file: str | None = None
    n_resumed: int = 0  # items taken from the checkpoint of an earlier, interrupted run
    energy_cpu_j: float | None = None  # energy of the evaluation (energy.measure_energy); None in older results
    energy_gpu_j: float | None = None
    energy_source: str | None = None  # which meter measured it (RAPL, NVML, or the CPU-time estimate)
    cpu_s: float | None = None  # CPU seconds the evaluation used

    @property
    def energy_j(self) -> float | None:
        """CPU plus GPU joules of the evaluation, or None when not measured."""
        if self.energy_cpu_j is None and self.energy_gpu_j is None:
            return None
        return (self.energy_cpu_j or 0.0) + (self.energy_gpu_j or 0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskSummary:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def rows(self) -> list[dict[str, Any]]:
        """One summary.csv row per metric."""
        common = {k: v for k, v in self.to_json().items() if k in SUMMARY_COLUMNS}
        return [{**common, "metric": name, "value": m["value"], "stderr": m["stderr"],
                 "ci95_low": m.get("ci95_low"), "ci95_high": m.get("ci95_high")} for name, m in self.metrics.items()]


def summarize(run: TaskRun, *, data_location: str, model_info: dict[str, Any], load: dict[str, Any],
              primary_metric: str | None = None, items_file: str | None = None, n_resumed: int = 0) -> TaskSummary:
    """Aggregate a TaskRun's items into a TaskSummary."""
    totals = run.totals or ItemTotals.of(run.items)  # set by TaskRun.__post_init__; the fallback is for typing
    latencies, scored = list(totals.latencies), totals.n_scored
    prompt, completion, evaluated = totals.prompt_tokens, totals.completion_tokens, totals.evaluated_tokens
    busy = math.fsum(latencies)
    return TaskSummary(
        model=run.model,
        backend=run.backend,
        dataset=run.dataset,
        scoring=run.scoring,
        num_fewshot=run.num_fewshot,
        prompt_version=run.prompt_version,
        n_items=scored,
        n_errors=totals.n_errors,
        metrics={m.name: {"value": m.value, "stderr": m.stderr,
                          "ci95_low": m.ci95[0] if m.ci95 else None, "ci95_high": m.ci95[1] if m.ci95 else None}
                 for m in run.metrics},
        wall_s=run.wall_s,
        # items taken from a checkpoint cost no model time: only the items computed now make the rate
        items_per_s=(scored - n_resumed) / run.wall_s if run.wall_s > 0 and scored > n_resumed else None,
        tokens_per_s=(prompt + completion) / run.wall_s if run.wall_s > 0 else None,
        evaluated_tokens_per_s=(evaluated + completion) / busy if busy > 0 else None,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(list(totals.ttfts), 50),
        prompt_tokens=prompt,
        completion_tokens=completion,
        evaluated_tokens=evaluated,
        peak_rss_mb=round(peak_rss_mb(), 1),
        data_location=data_location,
        primary_metric=primary_metric,
        model_info=model_info,
        load=load,
        items_file=items_file,
        n_resumed=n_resumed,
    )


def record_properties(summary: TaskSummary) -> list[tuple[str, Any]]:
    """The flat (name, value) pairs a test hands to ``record_property``."""
    props: list[tuple[str, Any]] = [
        (key, getattr(summary, key))
        for key in ("model", "backend", "dataset", "scoring", "num_fewshot", "n_items", "n_errors", "wall_s",
                    "items_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s",
                    "prompt_tokens", "completion_tokens", "peak_rss_mb", "data_location")
    ]
    for name, metric in summary.metrics.items():
        props.append((name, metric["value"]))
        props.append((f"{name}_stderr", metric["stderr"]))
    return props
