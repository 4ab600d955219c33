"""The model comparison a user decides with: accuracy with its 95% interval, cost, speed and memory per dataset and
overall, McNemar tests between every pair of models, the cost/accuracy Pareto front and (on request) the cost of
ownership. Built from summaries and items alone, so a saved results directory re-renders the same report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.eval.metrics import wilson_interval
from llmlab_fixtures.eval.summary import TaskSummary, percentile
from llmlab_fixtures.reports.cost import (
    SETTINGS,
    CostSettings,
    OwnershipRow,
    TaskCost,
    combine_costs,
    genai_prices_version,
    ownership_table,
    task_cost,
)
from llmlab_fixtures.reports.paired import OVERALL, PairedComparison, compare_pairs, compare_pairs_overall
from llmlab_fixtures.reports.speed import SpeedFigure
from llmlab_fixtures.reports.table import fixed, primary_metric, text_grid

Item = Mapping[str, Any]


@dataclass
class ComparisonRow:
    """One model on one dataset (or ``(all)``): the figures the comparison shows."""

    model: str
    dataset: str
    metric: str
    accuracy: float | None
    ci95_low: float | None
    ci95_high: float | None
    n_items: int
    cost: TaskCost
    tokens_per_s: float | None
    ttft_p50_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    peak_rss_mb: float | None
    pareto: bool = False  # on the cost/accuracy Pareto front of its dataset

    @property
    def accuracy_per_dollar(self) -> float | None:
        """Accuracy divided by the cost of 1K items: how much accuracy a dollar buys."""
        per_item = self.cost.per_1k_items
        return None if self.accuracy is None or not per_item else self.accuracy / per_item

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "kind": self.cost.kind, "metric": self.metric,
                "accuracy": self.accuracy, "ci95_low": self.ci95_low, "ci95_high": self.ci95_high,
                "n_items": self.n_items, "tokens_per_s": self.tokens_per_s, "ttft_p50_s": self.ttft_p50_s,
                "latency_p50_s": self.latency_p50_s, "latency_p95_s": self.latency_p95_s,
                "peak_rss_mb": self.peak_rss_mb, "pareto_front": self.pareto,
                "accuracy_per_dollar": self.accuracy_per_dollar, "cost": self.cost.to_json()}


@dataclass
class Report:
    """Everything the tables, plots, HTML and JSON show."""

    title: str
    summaries: list[TaskSummary]
    rows: list[ComparisonRow]  # per dataset, then overall (dataset ``(all)``)
    pairs: list[PairedComparison]  # per dataset
    overall_pairs: list[PairedComparison]
    settings: CostSettings
    ownership: list[OwnershipRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # model -> every scored item's latency
    price_source: str | None = None
    speeds: list[SpeedFigure] = field(default_factory=list)  # pp512 / tg128 / ttft from bench/test_speed.py

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(s.model for s in self.summaries))

    @property
    def datasets(self) -> list[str]:
        """The datasets in the tables: each dataset, then ``(all)`` when there is more than one."""
        names = list(dict.fromkeys(r.dataset for r in self.rows if r.dataset != OVERALL))
        return [*names, OVERALL] if len(names) > 1 else names

    @property
    def shown_rows(self) -> list[ComparisonRow]:
        """The rows the tables show (with a single dataset, ``(all)`` would repeat it)."""
        return [r for r in self.rows if r.dataset in self.datasets]

    @property
    def overall(self) -> list[ComparisonRow]:
        return [r for r in self.rows if r.dataset == OVERALL]

    def pareto_front(self, dataset: str = OVERALL) -> list[ComparisonRow]:
        """The front's models from cheapest to most accurate."""
        return sorted((r for r in self.rows if r.dataset == dataset and r.pareto),
                      key=lambda r: r.cost.per_1k_items or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"rows": [r.to_json() for r in self.rows],
                "paired": [p.to_json() for p in self.pairs],
                "paired_overall": [p.to_json() for p in self.overall_pairs],
                "pareto_front": {d: [r.model for r in self.pareto_front(d)]
                                 for d in dict.fromkeys(r.dataset for r in self.rows)},
                "ownership": [o.to_json() for o in self.ownership],
                "cost_settings": self.settings.to_json(),
                "price_source": self.price_source,
                "speed": [f.to_json() for f in self.speeds]}


def mark_pareto(rows: Sequence[ComparisonRow]) -> None:
    """Flag the rows no other row beats on both cost per 1K items (lower) and accuracy (higher)."""
    priced = [r for r in rows if r.cost.per_1k_items is not None and r.accuracy is not None]
    for row in priced:
        row.pareto = not any(
            o.cost.per_1k_items <= row.cost.per_1k_items and o.accuracy >= row.accuracy
            and (o.cost.per_1k_items < row.cost.per_1k_items or o.accuracy > row.accuracy)
            for o in priced if o is not row)


def _dataset_row(summary: TaskSummary, cost: TaskCost) -> ComparisonRow:
    name = primary_metric(summary) or "-"
    metric = summary.metrics.get(name, {})
    return ComparisonRow(summary.model, summary.dataset, name, metric.get("value"), metric.get("ci95_low"),
                         metric.get("ci95_high"), summary.n_items, cost, summary.tokens_per_s, summary.ttft_p50_s,
                         summary.latency_p50_s, summary.latency_p95_s, summary.peak_rss_mb)


def _overall_row(model: str, summaries: Sequence[TaskSummary], items: Sequence[Item],
                 costs: Sequence[TaskCost]) -> ComparisonRow:
    """Pooled over datasets: accuracy of every scored item (Wilson interval), tokens over wall time."""
    scored = [i for i in items if i.get("error") is None]
    judged = [bool(i["correct"]) for i in scored if i.get("correct") is not None]
    ci = wilson_interval(sum(judged), len(judged))
    wall = sum(s.wall_s for s in summaries)
    tokens = sum(s.prompt_tokens + s.completion_tokens for s in summaries)
    ttfts = [i["ttft_s"] for i in scored if i.get("ttft_s") is not None]
    latencies = [i["latency_s"] for i in scored]
    return ComparisonRow(model, OVERALL, "correct (pooled)", sum(judged) / len(judged) if judged else None,
                         ci[0] if ci else None, ci[1] if ci else None, len(judged), combine_costs(model, costs),
                         tokens / wall if wall > 0 else None, percentile(ttfts, 50), percentile(latencies, 50),
                         percentile(latencies, 95), max(s.peak_rss_mb for s in summaries))


def build_report(summaries: Sequence[TaskSummary], items: Sequence[Item], settings: CostSettings | None = None,
                 notes: Sequence[str] = (), title: str = "llmlab results",
                 speeds: Sequence[SpeedFigure] = ()) -> Report:
    """The whole comparison from a run's summaries and items (items.jsonl records)."""
    settings = settings or CostSettings()
    order = list(dict.fromkeys(s.model for s in summaries))
    by_task: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        by_task.setdefault((item.get("model"), item.get("dataset")), []).append(item)
    rows, overall = [], []
    costs: dict[str, list[TaskCost]] = {}
    for s in summaries:
        cost = task_cost(s, by_task.get((s.model, s.dataset), []), settings)
        costs.setdefault(s.model, []).append(cost)
        rows.append(_dataset_row(s, cost))
    for model in order:
        mine = [s for s in summaries if s.model == model]
        model_items = [i for s in mine for i in by_task.get((model, s.dataset), [])]
        overall.append(_overall_row(model, mine, model_items, costs[model]))
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mark_pareto([r for r in rows if r.dataset == dataset])
    mark_pareto(overall)
    known = {s.model for s in summaries}
    items = [i for i in items if i.get("model") in known]
    version = genai_prices_version()
    return Report(
        title=title, summaries=list(summaries), rows=rows + overall, pairs=compare_pairs(items, order),
        overall_pairs=compare_pairs_overall(items, order) if len({s.dataset for s in summaries}) > 1 else [],
        settings=settings,
        ownership=ownership_table([r.cost for r in overall], settings) if settings.include_analysis else [],
        notes=list(notes),
        latencies={m: [i.get("latency_s") or 0.0 for i in items if i.get("model") == m and i.get("error") is None]
                   for m in order},
        price_source=f"genai-prices {version}" if version else None,
        speeds=list(speeds),
    )


def money(value: float | None) -> str:
    """Dollars with enough significant digits for a fraction of a cent; ``n/a`` when unknown."""
    if value is None:
        return "n/a"
    if value == 0 or value >= 100:
        return f"${value:,.2f}" if value else "$0"
    digits = max(2, 3 - math.floor(math.log10(abs(value))))  # four significant digits, never 1e-05 notation
    return f"${value:.{digits}f}"


def _interval(row: ComparisonRow) -> str:
    return "-" if row.ci95_low is None else f"{row.ci95_low:.3f}-{row.ci95_high:.3f}"


def cost_table(report: Report, markdown: bool = False) -> list[str]:
    """Per dataset and overall: accuracy with its interval, cost per 1K tokens and items, speed and memory."""
    header = ["dataset", "model", "kind", "accuracy", "95% CI", "n", "cost", "$/1K tok", "$/1K items", "tok/s",
              "ttft p50 s", "p50 s", "p95 s", "peak MB", "Pareto"]
    rows = [[r.dataset, r.model, r.cost.kind, fixed(r.accuracy), _interval(r), str(r.n_items), money(r.cost.cost_usd),
             money(r.cost.per_1k_tokens), money(r.cost.per_1k_items), fixed(r.tokens_per_s, 1), fixed(r.ttft_p50_s),
             fixed(r.latency_p50_s), fixed(r.latency_p95_s), fixed(r.peak_rss_mb, 0), "yes" if r.pareto else ""]
            for r in report.shown_rows]
    return text_grid(header, rows, markdown)


def cost_notes(report: Report) -> list[str]:
    """How each overall cost was made (or why it is n/a), one line per model."""
    return [f"{r.model}: {money(r.cost.cost_usd)} — {note.removeprefix('n/a: ')}" for r in report.overall
            for note in [_task_notes(report, r.model)]]


def _task_notes(report: Report, model: str) -> str:
    notes = list(dict.fromkeys(r.cost.note for r in report.rows if r.model == model and r.dataset != OVERALL))
    return notes[0] if len(notes) == 1 else "; ".join(notes)


def assumption_lines(report: Report) -> list[str]:
    """Every cost assumption, with its value and where it came from."""
    settings = report.settings
    lines = [f"{s.name} = {settings.describe(s.name)}: {s.help}" for s in SETTINGS]
    for model, price in settings.prices.items():
        lines.append(f"price of {model}: ${price.input_per_mtok:g} / ${price.output_per_mtok:g} per million input / "
                     f"output tokens ({price.source})")
    lines.append(f"cloud prices: {report.price_source or 'genai-prices not installed'} (bundled offline price data) "
                 "unless configured")
    return lines


def significance_table(pairs: Sequence[PairedComparison], markdown: bool = False) -> list[str]:
    """Per pair of models: the accuracy difference on shared items and the exact McNemar p-value."""
    header = ["dataset", "model A", "model B", "n", "A right", "B right", "only A", "only B", "McNemar p", "verdict"]
    rows = [[p.dataset, p.model_a, p.model_b, str(p.n), str(p.both_correct + p.only_a),
             str(p.both_correct + p.only_b), str(p.only_a), str(p.only_b), f"{p.mcnemar_p:.4g}", p.verdict]
            for p in pairs]
    return text_grid(header, rows, markdown)


def pareto_lines(report: Report) -> list[str]:
    """The cost/accuracy Pareto front of each dataset, cheapest first, and the best accuracy per dollar."""
    lines = []
    for dataset in report.datasets:
        front = report.pareto_front(dataset)
        shown = " → ".join(f"{r.model} ({fixed(r.accuracy)} at {money(r.cost.per_1k_items)}/1K items)" for r in front)
        lines.append(f"{dataset}: {shown or 'no model has both a cost and an accuracy'}")
    ranked = [r for r in report.overall if r.accuracy_per_dollar is not None]
    if ranked:
        best = max(ranked, key=lambda r: r.accuracy_per_dollar or 0.0)
        lines.append(f"best accuracy per dollar: {best.model} ({best.accuracy_per_dollar:.4g} accuracy per $ "
                     "spent on 1K items)")
    return lines


def _tokens(n: float | None) -> str:
    return "never" if n is None else f"{n:,.0f}"


def ownership_lines(report: Report, markdown: bool = False) -> list[str]:
    """--include-cost-analysis: each local model against each cloud model at the monthly volume."""
    if not report.ownership:
        return ["no local/cloud pair with known costs to compare"]
    header = ["local model", "cloud model", "tokens/month", "machines", "local $/month", "(energy)", "(hardware)",
              "cloud $/month", "break-even tokens/month", "payback months"]
    rows = [[o.local_model, o.cloud_model, f"{o.monthly_tokens:,.0f}", str(o.machines), money(o.local_monthly_usd),
             money(o.local_energy_monthly_usd), money(o.local_hardware_monthly_usd), money(o.cloud_monthly_usd),
             _tokens(o.break_even_tokens), "never" if o.payback_months is None else f"{o.payback_months:.1f}"]
            for o in report.ownership]
    return text_grid(header, rows, markdown)


def ownership_notes(report: Report) -> list[str]:
    """Each local model's capacity, and whether its break-even volume needs more than one machine."""
    return list(dict.fromkeys(f"{o.local_model}: {o.note}" for o in report.ownership))


def markdown_sections(report: Report) -> list[str]:
    """The cost, significance, Pareto and ownership sections of summary.md."""
    lines = ["", "## Cost, speed and accuracy (95% Wilson interval)", ""]
    lines += cost_table(report, markdown=True)
    lines += ["", "### How each cost was made", ""] + [f"- {n}" for n in cost_notes(report)]
    lines += ["", "### Assumptions", ""] + [f"- {a}" for a in assumption_lines(report)]
    if report.pairs:
        lines += ["", "## Is the difference real? (exact McNemar test on shared items)", ""]
        lines += significance_table([*report.pairs, *report.overall_pairs], markdown=True)
    lines += ["", "## Cost/accuracy Pareto front", ""] + [f"- {line}" for line in pareto_lines(report)]
    if report.settings.include_analysis:
        lines += ["", "## Total cost of ownership", "", *ownership_lines(report, markdown=True), ""]
        lines += [f"- {note}" for note in ownership_notes(report)]
    return lines
