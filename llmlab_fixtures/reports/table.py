"""Render merged results as comparison tables (terminal text and Markdown)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from llmlab_fixtures.eval.summary import TaskSummary
from llmlab_fixtures.reports.speed import SpeedFigure, speed_cells

if TYPE_CHECKING:
    from llmlab_fixtures.reports.paired import PairedComparison


def fixed(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``-`` when unknown."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_size(n: float | None) -> str:
    """Bytes as MiB or GiB (binary units, as memory is counted); ``-`` when unknown."""
    return "-" if not n else f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def primary_metric(summary: TaskSummary) -> str | None:
    """The metric shown in the models × datasets table: the task's primary metric (else its first)."""
    if summary.primary_metric in summary.metrics:
        return summary.primary_metric
    return next(iter(summary.metrics), None)


def text_grid(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, rule: bool = True) -> list[str]:
    """Rows under a header, as a Markdown table or as aligned text (with a dashed rule unless ``rule`` is False)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    return [lines[0], "-" * len(lines[0]), *lines[1:]] if rule else lines


def comparison_table(summaries: Sequence[TaskSummary], markdown: bool = False, speeds: Sequence[SpeedFigure] = (),
                     extra_rows: Sequence[tuple[str, Mapping[str, str]]] = ()) -> list[str]:
    """Datasets × models: each cell is the dataset's primary metric ± stderr, and items/s; then the llama-bench
    style speed rows (pp512, tg128, ttft) when the speed module ran, ``extra_rows`` (a label and each model's cell)
    and where each model's data went."""
    models = list(dict.fromkeys([*(s.model for s in summaries), *(f.model for f in speeds)]))
    datasets = list(dict.fromkeys(s.dataset for s in summaries))
    by_key = {(s.model, s.dataset): s for s in summaries}
    rows = []
    for dataset in datasets:
        scored = [s for s in summaries if s.dataset == dataset]
        metric_name = primary_metric(next((s for s in scored if s.metrics), scored[0]))
        cells = [f"{dataset} ({metric_name or '-'})"]
        for model in models:
            s = by_key.get((model, dataset))
            if s is None:
                cells.append("-")
                continue
            metric = s.metrics.get(metric_name or "", {"value": None, "stderr": None})
            errors = f", {s.n_errors} errors" if s.n_errors else ""
            errors += f", {s.n_resumed} resumed" if s.n_resumed else ""
            speed = f"{fixed(s.items_per_s, 1)} it/s{errors}"
            cells.append(f"{fixed(metric['value'])} ± {fixed(metric['stderr'])} ({speed})")
        rows.append(cells)
    rows += speed_cells(speeds, models)
    rows += [[label, *(cells.get(m, "-") for m in models)] for label, cells in extra_rows]
    locations = {f.model: f.data_location for f in speeds} | {s.model: s.data_location for s in summaries}
    rows.append(["data sent to", *(locations.get(m, "-") for m in models)])
    return text_grid(["dataset (metric)", *models], rows, markdown)


def privacy_note(summaries: Sequence[TaskSummary], blocked: Sequence[str]) -> str:
    """What a --local-only run can say about where its data went, backed by the network guard."""
    remote = sorted({s.model for s in summaries if s.data_location.startswith("cloud")})
    if blocked:
        return (f"--local-only: the network guard REFUSED connections to {', '.join(blocked)}; "
                "no data left the machine, but something tried to send it")
    if remote:
        return f"--local-only: data went off the machine for {', '.join(remote)}"
    return ("--local-only: every model ran in-process or on a loopback server; the network guard refused "
            "all other connections and none was attempted")


def detail_table(summaries: Sequence[TaskSummary], markdown: bool = False) -> list[str]:
    """One row per (model, dataset, metric) with the speed and memory figures."""
    header = ["model", "dataset", "metric", "value", "stderr", "95% CI", "n", "errors", "scoring", "shots", "items/s",
              "tok/s", "p50 s", "p95 s", "ttft s", "peak MB"]
    rows = []
    for s in summaries:
        for name, metric in s.metrics.items():
            low, high = metric.get("ci95_low"), metric.get("ci95_high")
            interval = "-" if low is None or high is None else f"{low:.3f}-{high:.3f}"
            rows.append([s.model, s.dataset, name, fixed(metric["value"], 4), fixed(metric["stderr"], 4), interval,
                         str(s.n_items), str(s.n_errors), s.scoring, str(s.num_fewshot), fixed(s.items_per_s, 2),
                         fixed(s.tokens_per_s, 0), fixed(s.latency_p50_s, 3), fixed(s.latency_p95_s, 3),
                         fixed(s.ttft_p50_s, 3), fixed(s.peak_rss_mb, 0)])
    return text_grid(header, rows, markdown)


def agreement_table(comparisons: Sequence[PairedComparison], markdown: bool = False) -> list[str]:
    """Per dataset and pair of models: items compared, same prediction, both right, only one right."""
    header = ["dataset", "model A", "model B", "n", "same prediction", "both right", "only A right", "only B right"]
    rows = [[c.dataset, c.model_a, c.model_b, str(c.n), f"{c.same_prediction} ({c.agreement:.0%})",
             str(c.both_correct), str(c.only_a), str(c.only_b)] for c in comparisons]
    return text_grid(header, rows, markdown)


def markdown_report(summaries: Sequence[TaskSummary], title: str, notes: Sequence[str] = (),
                    comparisons: Sequence[PairedComparison] = (), speeds: Sequence[SpeedFigure] = ()) -> str:
    """summary.md: the comparison table, the detail table, item-by-item agreement and the run's notes."""
    lines = [f"# {title}", "", "## Comparison (primary metric ± stderr, items/s)", ""]
    lines += comparison_table(summaries, markdown=True, speeds=speeds)
    lines += ["", "## All metrics", ""]
    lines += detail_table(summaries, markdown=True)
    if comparisons:
        lines += ["", "## Same items, model against model", ""]
        lines += agreement_table(comparisons, markdown=True)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
