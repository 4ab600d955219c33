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

from llmlab_fixtures.paired import PairedComparison, compare_pairs, read_items
from llmlab_fixtures.records import ItemRecord
from llmlab_fixtures.summary import SUMMARY_COLUMNS, TaskSummary
from llmlab_fixtures.table import markdown_report

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


def part_path(output_dir: Path, worker: str, model: str, dataset: str) -> Path:
    """Where a worker streams the items of one (model, dataset)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}__{dataset}")
    return output_dir / PARTS_DIR / worker / f"{safe}.jsonl"


def summary_csv(summaries: Sequence[TaskSummary]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for summary in summaries:
        writer.writerows(summary.rows())
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
    }


def model_loads(summaries: Iterable[TaskSummary]) -> dict[str, list[dict[str, Any]]]:
    """Each model's distinct loads (worker, pid, load id): more than one means it was loaded twice."""
    loads: dict[str, dict[str, dict[str, Any]]] = {}
    for s in summaries:
        if s.load:
            loads.setdefault(s.model, {})[s.load["load_id"]] = s.load
    return {model: list(by_id.values()) for model, by_id in loads.items()}


def merge_items(output_dir: Path, summaries: Sequence[TaskSummary]) -> Path:
    """Concatenate the part files into items.jsonl in summary order, then remove the parts."""
    target = output_dir / "items.jsonl"
    chunks = []
    for summary in summaries:
        if summary.items_file and (output_dir / summary.items_file).is_file():
            chunks.append((output_dir / summary.items_file).read_text(encoding="utf-8"))
    atomic_write_text(target, "".join(chunks))
    return target


def write_results(output_dir: Path, summaries: Sequence[TaskSummary], *, formats: Sequence[str],
                  config: dict[str, Any], notes: Sequence[str] = ()) -> tuple[list[Path], list[PairedComparison]]:
    """Write the results directory; returns the files written and the model-against-model comparisons."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [merge_items(output_dir, summaries)]
    comparisons = compare_pairs(read_items(written[0]), list(dict.fromkeys(s.model for s in summaries)))
    if "csv" in formats:
        written.append(output_dir / "summary.csv")
        atomic_write_text(written[-1], summary_csv(summaries))
    if "markdown" in formats:
        written.append(output_dir / "summary.md")
        atomic_write_text(written[-1], markdown_report(summaries, "llmlab results", notes, comparisons))
    if "json" in formats:
        written.append(output_dir / "results.json")
        document = {
            "config": config,
            "versions": versions(),
            "machine": machine(),
            "models": {s.model: s.model_info for s in summaries},
            "model_loads": model_loads(summaries),
            "summary": [s.to_json() for s in summaries],
            "paired": [asdict(c) for c in comparisons],
            "notes": list(notes),
        }
        atomic_write_text(written[-1], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return written, comparisons


def remove_parts(output_dir: Path) -> None:
    """Drop the per-worker part files once items.jsonl holds them."""
    import shutil

    shutil.rmtree(output_dir / PARTS_DIR, ignore_errors=True)
