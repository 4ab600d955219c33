"""Plots of a comparison report as inline SVG (matplotlib, Agg backend, no pyplot state): accuracy vs cost with the
Pareto front, tokens/s per model, and each model's latency distribution."""

from __future__ import annotations

import io
import re

from llmlab_fixtures.reports.comparison import Report, money

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _figure(width: float = 7.0, height: float = 4.2):  # -> matplotlib.figure.Figure
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(figure) -> str:
    """The figure as an ``<svg>`` element to inline in HTML (text kept as text, no XML prologue)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "llmlab"}):  # stable ids: the same report renders the same file
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _empty(figure, message: str) -> str:
    axes = figure.subplots()
    axes.axis("off")
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#555")
    return _svg(figure)


def accuracy_vs_cost(report: Report) -> str:
    """Overall accuracy (with its 95% interval) against cost per 1K items, the Pareto front drawn as a step line."""
    figure = _figure(7.0, 5.0)
    points = [r for r in report.overall if r.accuracy is not None and r.cost.per_1k_items is not None]
    if not points:
        return _empty(figure, "no model has both an accuracy and a known cost")
    axes = figure.subplots()
    positive = all((r.cost.per_1k_items or 0) > 0 for r in points)
    if positive:
        axes.set_xscale("log")
    for i, row in enumerate(points):
        colour = _COLOURS[i % len(_COLOURS)]
        low = row.accuracy - (row.ci95_low if row.ci95_low is not None else row.accuracy)
        high = (row.ci95_high if row.ci95_high is not None else row.accuracy) - row.accuracy
        axes.errorbar([row.cost.per_1k_items], [row.accuracy], yerr=[[low], [high]], fmt="o", color=colour,
                      capsize=4, markersize=8, label=f"{row.model} ({row.cost.kind})")
    front = sorted((r for r in points if r.pareto), key=lambda r: r.cost.per_1k_items or 0.0)
    if front:
        axes.step([r.cost.per_1k_items for r in front], [r.accuracy for r in front], where="post", color="#333",
                  linestyle="--", linewidth=1.2, label="Pareto front")
    if positive:  # at least a decade either way, labelled in dollars rather than 10^-3 notation
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        costs = [r.cost.per_1k_items or 0.0 for r in points]
        axes.set_xlim(min(costs) / 3, max(costs) * 3)
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: money(value)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("cost per 1K items (USD" + (", log scale)" if positive else ")"))
    axes.set_ylabel("accuracy, all datasets (95% CI)")
    axes.set_ylim(0, 1)
    axes.set_title("Accuracy vs cost")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    missing = [r.model for r in report.overall if r.cost.per_1k_items is None]
    if missing:
        axes.text(0.01, 0.98, f"not plotted, no cost (n/a): {', '.join(missing)}", transform=axes.transAxes,
                  va="top", fontsize=7, color="#a00")
    return _svg(figure)


def tokens_per_second(report: Report) -> str:
    """A bar per model: tokens (prompt + completion) per second of wall time, all datasets."""
    figure = _figure(7.0, 3.6)
    rows = [r for r in report.overall if r.tokens_per_s is not None]
    if not rows:
        return _empty(figure, "no throughput measured")
    axes = figure.subplots()
    bars = axes.barh([r.model for r in rows], [r.tokens_per_s for r in rows],
                     color=[_COLOURS[i % len(_COLOURS)] for i in range(len(rows))])
    axes.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("tokens/s (prompt + completion over wall time)")
    axes.set_title("Throughput")
    axes.grid(True, axis="x", alpha=0.3)
    return _svg(figure)


def latency_distribution(report: Report) -> str:
    """A box plot per model of every scored item's latency."""
    figure = _figure(7.0, 3.6)
    data = {m: v for m, v in report.latencies.items() if v}
    if not data:
        return _empty(figure, "no latencies recorded")
    axes = figure.subplots()
    axes.boxplot(list(data.values()), orientation="horizontal", tick_labels=list(data), showfliers=True)
    axes.invert_yaxis()
    axes.set_xlabel("latency per item (s)")
    axes.set_title("Latency distribution")
    axes.grid(True, axis="x", alpha=0.3)
    return _svg(figure)


def all_plots(report: Report) -> dict[str, str]:
    """Title -> inline SVG of every plot."""
    plots = {"Accuracy vs cost (Pareto front)": accuracy_vs_cost(report),
             "Tokens per second": tokens_per_second(report),
             "Latency distribution": latency_distribution(report)}
    # ids must be unique when several SVGs share one page: prefix each plot's ids
    return {title: re.sub(r'(id="|href="#|url\(#)', rf"\g<1>p{n}-", svg) for n, (title, svg) in
            enumerate(plots.items())}
