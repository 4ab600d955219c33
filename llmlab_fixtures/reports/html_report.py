"""The comparison report as HTML: a standalone, self-contained report.html, and the fragment llmlab adds to the
pytest-html report's summary. Plots are inline SVG, styles inline: the file needs nothing else to display."""

from __future__ import annotations

import html
from collections.abc import Sequence

from llmlab_fixtures.reports.comparison import (
    Report,
    assumption_lines,
    cost_notes,
    cost_table,
    ownership_lines,
    ownership_notes,
    pareto_lines,
    significance_table,
)
from llmlab_fixtures.reports.table import comparison_table

STYLE = """
.llmlab { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; }
.llmlab h1 { font-size: 1.6em; } .llmlab h2 { font-size: 1.25em; margin-top: 1.4em; }
.llmlab table.llmlab-table { border-collapse: collapse; margin: 0.5em 0; font-size: 13px; }
.llmlab table.llmlab-table th, .llmlab table.llmlab-table td { border: 1px solid #ccc; padding: 3px 7px;
  text-align: left; white-space: nowrap; }
.llmlab table.llmlab-table td:last-child { white-space: normal; }
.llmlab table.llmlab-table th { background: #eef2f7; }
.llmlab table.llmlab-table tr:nth-child(even) td { background: #fafafa; }
.llmlab .plots { display: flex; flex-wrap: wrap; gap: 16px; }
.llmlab .plot { border: 1px solid #ddd; padding: 6px; background: #fff; flex: 0 1 640px; }
.llmlab .plot h3 { margin: 4px 0; font-size: 1em; }
.llmlab .plot svg { width: 100%; height: auto; }
.llmlab ul { font-size: 13px; } .llmlab .muted { color: #666; font-size: 12px; }
"""


def grid_html(lines: Sequence[str]) -> str:
    """A Markdown table (as table.text_grid writes it) as an HTML table."""
    def cells(line: str) -> list[str]:
        return [html.escape(c.strip()) for c in line.strip().strip("|").split(" | ")]

    if len(lines) < 2:
        return ""
    head = "".join(f"<th>{c}</th>" for c in cells(lines[0]))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(line)) + "</tr>" for line in lines[2:])
    return f'<table class="llmlab-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _list(lines: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def report_body(report: Report, plots: dict[str, str] | None = None) -> str:
    """The report's sections (tables, plots, assumptions) as an HTML ``<div class="llmlab">``."""
    if plots is None:
        from llmlab_fixtures.reports.plots import all_plots

        plots = all_plots(report)
    parts = ['<div class="llmlab">', "<h2>Comparison (primary metric ± stderr, items/s)</h2>",
             grid_html(comparison_table(report.summaries, markdown=True)),
             "<h2>Cost, speed and accuracy (95% Wilson interval)</h2>", grid_html(cost_table(report, markdown=True)),
             _list(cost_notes(report)), '<div class="plots">']
    parts += [f'<div class="plot"><h3>{html.escape(title)}</h3>{svg}</div>' for title, svg in plots.items()]
    parts.append("</div>")
    if report.pairs:
        parts += ["<h2>Is the difference real? (exact McNemar test on shared items)</h2>",
                  grid_html(significance_table([*report.pairs, *report.overall_pairs], markdown=True))]
    parts += ["<h2>Cost/accuracy Pareto front</h2>", _list(pareto_lines(report))]
    if report.settings.include_analysis:
        parts += [f"<h2>Total cost of ownership at {report.settings.monthly_tokens:,.0f} tokens/month</h2>",
                  grid_html(ownership_lines(report, markdown=True)) if report.ownership
                  else _list(ownership_lines(report)), _list(ownership_notes(report))]
    parts += ["<h2>Cost assumptions</h2>", _list(assumption_lines(report))]
    if report.notes:
        parts += ["<h2>Notes</h2>", _list(report.notes)]
    parts.append("</div>")
    return "\n".join(parts)


def standalone_html(report: Report, plots: dict[str, str] | None = None) -> str:
    """report.html: one self-contained page (no scripts, no external files)."""
    title = html.escape(report.title)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>body {{ margin: 24px; background: #fff; }}{STYLE}</style></head>\n"
            f'<body><div class="llmlab"><h1>{title}</h1>'
            f'<p class="muted">models: {html.escape(", ".join(report.models))}</p></div>\n'
            f"{report_body(report, plots)}\n</body></html>\n")


def pytest_html_fragment(report: Report) -> str:
    """What llmlab adds to the pytest-html report's summary: its own styles, then the report body."""
    return f"<style>{STYLE}</style>\n{report_body(report)}"
