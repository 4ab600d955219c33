"""The results directory: items.jsonl, summary.csv, summary.md, results.json — written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from llmlab_fixtures.eval.records import ItemRecord
from llmlab_fixtures.eval.summary import SUMMARY_COLUMNS, TaskSummary
from llmlab_fixtures.reports.comparison import Report, build_report, markdown_sections
from llmlab_fixtures.reports.cost import CostSettings, genai_prices_version
from llmlab_fixtures.reports.paired import read_items
from llmlab_fixtures.reports.speed import SpeedFigure
from llmlab_fixtures.reports.table import markdown_report

PARTS_DIR = "parts"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ItemWriter:
    """Streams one (model, dataset)'s item records to a part file as they finish."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = path.open("w", encoding="utf-8")

    def write(self, item: ItemRecord) -> None:
        self._handle.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def unload_path(output_dir: Path, load_id: str) -> Path:
    """Where a worker records a model's unload (the controller merges it into results.json's model_loads)."""
    return output_dir / PARTS_DIR / "unloads" / f"{load_id}.json"


def part_path(output_dir: Path, worker: str, model: str, dataset: str) -> Path:
    """Where a worker streams the items of one (model, dataset)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}__{dataset}")
    return output_dir / PARTS_DIR / worker / f"{safe}.jsonl"


def summary_csv(summaries: Sequence[TaskSummary], report: Report | None = None) -> str:
    """summary.csv: a row per (model, dataset, metric), with the task's cost figures when a report is given."""
    costs = {(r.model, r.dataset): r for r in report.rows} if report else {}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for summary in summaries:
        row = costs.get((summary.model, summary.dataset))
        extra = {} if row is None else {"cost_usd": row.cost.cost_usd, "cost_per_1k_tokens": row.cost.per_1k_tokens,
                                        "cost_per_1k_items": row.cost.per_1k_items, "cost_note": row.cost.note,
                                        "pareto_front": row.pareto}
        writer.writerows({**r, **extra} for r in summary.rows())
    return buffer.getvalue()


def paired_csv(report: Report) -> str:
    """paired.csv: every pair of models on shared items, with the exact McNemar p-value."""
    columns = ["dataset", "model_a", "model_b", "n", "same_prediction", "both_correct", "only_a", "only_b",
               "agreement", "mcnemar_p", "significant", "verdict"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(p.to_json() for p in [*report.pairs, *report.overall_pairs])
    return buffer.getvalue()


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape the numbers."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("llmlab", "pytest", "pytest-xdist", "llama_cpp_python", "transformers", "torch", "ollama"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    """The machine the run happened on."""
    import psutil

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        **gpu_section(),
    }


def gpu_section() -> dict[str, Any]:
    """GPUs and llama.cpp offload support (torch is asked only if this process imported it)."""
    from llmlab_fixtures.models.resources import system_info

    info = system_info()
    return {k: info[k] for k in ("gpus", "llama_cpp_gpu_offload", "torch") if k in info}


def model_loads(summaries: Iterable[TaskSummary]) -> dict[str, list[dict[str, Any]]]:
    """Each model's distinct loads (worker, pid, load id): more than one means it was loaded twice."""
    loads: dict[str, dict[str, dict[str, Any]]] = {}
    for s in summaries:
        if s.load:
            loads.setdefault(s.model, {})[s.load["load_id"]] = s.load
    return {model: list(by_id.values()) for model, by_id in loads.items()}


def write_run(output_dir: Path, summaries: Sequence[TaskSummary], items: Path, *, formats: Sequence[str],
              config: dict[str, Any], notes: Sequence[str] = (), cost: CostSettings | None = None,
              speeds: Sequence[SpeedFigure] = ()) -> tuple[list[Path], Report]:
    """Build the comparison report of merged results (``items``: the merged items.jsonl) and write every
    requested format."""
    report = build_report(summaries, read_items(items), cost, notes, speeds=speeds)
    document = results_document(report, config)
    return [items, *write_report_files(output_dir, report, formats, document)], report


def results_document(report: Report, config: dict[str, Any]) -> dict[str, Any]:
    """results.json: configuration, versions, machine, models, summaries, comparison, costs and notes."""
    summaries = report.summaries
    return {
        "config": config,
        "versions": {**versions(), "genai-prices": genai_prices_version()},
        "machine": machine(),
        "models": {s.model: s.model_info for s in summaries},
        "model_loads": model_loads(summaries),
        "summary": [s.to_json() for s in summaries],
        "paired": [asdict(c) for c in report.pairs],
        "comparison": report.to_json(),
        "notes": list(report.notes),
    }


def write_report_files(output_dir: Path, report: Report, formats: Sequence[str],
                       document: dict[str, Any] | None) -> list[Path]:
    """summary.csv + paired.csv, summary.md, results.json (when ``document`` is given), report.html: as requested."""
    from llmlab_fixtures.reports.html_report import standalone_html

    written = []
    if "csv" in formats:
        written.append(output_dir / "summary.csv")
        atomic_write_text(written[-1], summary_csv(report.summaries, report))
        if report.pairs:
            written.append(output_dir / "paired.csv")
            atomic_write_text(written[-1], paired_csv(report))
    if "markdown" in formats:
        written.append(output_dir / "summary.md")
        text = markdown_report(report.summaries, report.title, report.notes, report.pairs, report.speeds)
        atomic_write_text(written[-1], text + "\n".join(markdown_sections(report)) + "\n")
    if "json" in formats and document is not None:
        written.append(output_dir / "results.json")
        atomic_write_text(written[-1], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    if "html" in formats:
        written.append(output_dir / "report.html")
        atomic_write_text(written[-1], standalone_html(report))
    return written

