"""The terminal summary of a run (live, and ``llmlab report``): one compact comparison table, model against model on
the same items, each model's cost in one line and the cost assumptions once. The details (every cost derivation,
the Pareto front, plots) stay in results.json, summary.md and report.html."""

from __future__ import annotations

from llmlab_fixtures.reports.comparison import ComparisonRow, Report, money, ownership_lines, ownership_notes
from llmlab_fixtures.reports.cost import SETTINGS, TaskCost
from llmlab_fixtures.reports.paired import PairedComparison
from llmlab_fixtures.reports.table import comparison_table, fixed, text_grid

WIDTH = 118


def terminal_report(report: Report, scoring: str) -> list[str]:
    """Every line of the terminal summary."""
    lines = [f"== llmlab comparison ({scoring} scoring)",
             *comparison_table_lines(report)]
    if report.pairs:
        lines += ["-- same items, model against model (exact McNemar test: is the difference real?)",
                  *pairs_table([*report.pairs, *report.overall_pairs])]
    if report.summaries:
        lines += ["-- cost", *(cost_line(row.cost) for row in report.overall), *assumptions_wrapped(report)]
    if report.settings.include_analysis:
        lines += [f"-- total cost of ownership at {report.settings.monthly_tokens:,.0f} tokens/month",
                  *ownership_lines(report), *ownership_notes(report)]
    lines += [f"note: {note}" for note in report.notes]
    return lines


def comparison_table_lines(report: Report) -> list[str]:
    """Datasets × models, then each model over all datasets: accuracy with its 95% interval, cost and memory."""
    overall = report.overall
    extra = []
    if len(report.datasets) > 1:
        extra.append(("all datasets (95% CI)", {row.model: _overall_accuracy(row) for row in overall}))
    if overall:
        extra.append(("cost / 1K items", {row.model: money(row.cost.per_1k_items) for row in overall}))
        extra.append(("peak memory (MB)", {row.model: fixed(row.peak_rss_mb, 0) for row in overall}))
    return comparison_table(report.summaries, speeds=report.speeds, extra_rows=extra)


def _overall_accuracy(row: ComparisonRow) -> str:
    if row.accuracy is None:
        return "-"
    interval = f" [{fixed(row.ci95_low)}-{fixed(row.ci95_high)}]" if row.ci95_low is not None else ""
    return f"{fixed(row.accuracy)}{interval}"


def pairs_table(pairs: list[PairedComparison]) -> list[str]:
    """Per dataset and pair of models: shared items, agreement, who alone was right, and McNemar's verdict."""
    header = ["dataset", "model A", "model B", "n", "same prediction", "only A right", "only B right", "McNemar p",
              "verdict"]
    rows = [[p.dataset, p.model_a, p.model_b, str(p.n), f"{p.same_prediction} ({p.agreement:.0%})", str(p.only_a),
             str(p.only_b), f"{p.mcnemar_p:.4g}", p.verdict] for p in pairs]
    return text_grid(header, rows, markdown=False)


def cost_line(cost: TaskCost) -> str:
    """One model's cost over the run and, for a local model, the short form of its derivation."""
    spent = f"{cost.model}: {money(cost.cost_usd)} for {cost.n_items:,} items"
    if cost.cost_usd is None:
        return f"{spent} ({cost.note.removeprefix('n/a: ')})"
    if cost.kind != "local":
        return f"{spent} ({cost.note})"
    vm = f"; at the VM rate {money(cost.vm_usd)}" if cost.vm_usd is not None else ""
    return (f"{spent} = energy {cost.energy_j or 0:,.0f} J ({cost.energy_meter or 'unmeasured'}) "
            f"{money(cost.energy_usd)} + hardware {money(cost.hardware_usd)} for {cost.wall_s:,.1f} s{vm}")


def assumptions_wrapped(report: Report) -> list[str]:
    """The cost assumptions once, each with its source, wrapped to the terminal."""
    settings = report.settings
    shown = [s for s in SETTINGS if s.name != "monthly_tokens" or settings.include_analysis]
    parts = [f"{s.name} = {settings.describe(s.name)}" for s in shown]
    parts += [f"price of {model}: ${price.input_per_mtok:g} / ${price.output_per_mtok:g} per million input / output "
              f"tokens ({price.source})" for model, price in settings.prices.items()]
    parts.append(f"cloud prices: {report.price_source or 'genai-prices not installed'} (offline) unless configured")
    lines = ["assumptions:"]
    for part in parts:  # lines break between assumptions, never inside one
        if len(lines[-1]) + len(part) + 2 > WIDTH and lines[-1].strip() != "assumptions:":
            lines[-1] += ";"
            lines.append(" ")
        lines[-1] += (" " if lines[-1].strip() in ("", "assumptions:") else "; ") + part
    return lines
