"""``llmlab report <run-dir> [<run-dir> ...]``: re-render the tables, plots and HTML of saved results directories
(results.json + items.jsonl) without running any model, and compare runs made at different times."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.eval.summary import TaskSummary
from llmlab_fixtures.reports.comparison import Report, build_report
from llmlab_fixtures.reports.cost import CostSettings, parse_number
from llmlab_fixtures.reports.paired import read_items
from llmlab_fixtures.reports.results_dir import atomic_write_text, write_report_files
from llmlab_fixtures.reports.speed import SpeedFigure
from llmlab_fixtures.reports.terminal import terminal_report


@dataclass
class SavedRun:
    """One results directory as a run left it."""

    path: Path
    summaries: list[TaskSummary]
    items: list[dict[str, Any]]
    settings: CostSettings
    notes: list[str]
    scoring: str
    speeds: list[SpeedFigure] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(path: Path) -> SavedRun:
    """Read a results directory; ConfigError says what is missing."""
    results, items = path / "results.json", path / "items.jsonl"
    if not results.is_file() or not items.is_file():
        missing = "results.json" if not results.is_file() else "items.jsonl"
        raise ConfigError(f"{path} is not a results directory (no {missing}); give a directory a run wrote with "
                          "--export-format including json, e.g. .llmlab/runs/<timestamp>")
    try:
        document = json.loads(results.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{results} is not valid JSON ({exc}); was the run interrupted while writing it?") from None
    summaries = [TaskSummary.from_json(s) for s in document.get("summary", [])]
    settings = CostSettings.from_json((document.get("comparison") or {}).get("cost_settings"))
    scorings = sorted({s.scoring for s in summaries})
    speeds = [SpeedFigure(**f) for f in (document.get("comparison") or {}).get("speed", [])]
    return SavedRun(path, summaries, read_items(items), settings, list(document.get("notes", [])),
                    "/".join(scorings) or "-", speeds)


def _relabel(run: SavedRun, shared: set[str]) -> SavedRun:
    """Models that appear in several runs are told apart as ``model [run-dir name]``."""
    names = {m: f"{m} [{run.name}]" for m in shared}
    if not names:
        return run
    summaries = [replace(s, model=names.get(s.model, s.model)) for s in run.summaries]
    items = [{**i, "model": names.get(i.get("model"), i.get("model"))} for i in run.items]
    speeds = [replace(f, model=names.get(f.model, f.model)) for f in run.speeds]
    return replace(run, summaries=summaries, items=items, speeds=speeds)


def combined_report(runs: Sequence[SavedRun], settings: CostSettings | None = None) -> Report:
    """One report over one or more saved runs (each run's own cost settings unless ``settings`` is given)."""
    if len(runs) == 1:
        run = runs[0]
        return build_report(run.summaries, run.items, settings or run.settings, run.notes, speeds=run.speeds)
    seen: dict[str, int] = {}
    for run in runs:
        for model in {s.model for s in run.summaries}:
            seen[model] = seen.get(model, 0) + 1
    shared = {m for m, count in seen.items() if count > 1}
    relabelled = [_relabel(run, shared) for run in runs]
    notes = [f"run {r.path}: {', '.join(dict.fromkeys(s.model for s in r.summaries))}" for r in relabelled]
    notes += [f"[{r.name}] {note}" for r in relabelled for note in r.notes]
    chosen = settings or relabelled[0].settings
    if settings is None and any(r.settings.to_json() != chosen.to_json() for r in relabelled[1:]):
        notes.append(f"the runs were made with different cost settings; all are costed with those of {runs[0].path}")
    return build_report([s for r in relabelled for s in r.summaries], [i for r in relabelled for i in r.items],
                        chosen, notes, title=f"llmlab results: {len(runs)} runs compared",
                        speeds=[f for r in relabelled for f in r.speeds])


def add_report_parser(commands: Any) -> None:
    """Register ``llmlab report`` on the ``llmlab`` command's subparsers."""
    parser = commands.add_parser("report", help="re-render tables, plots and HTML from saved results directories")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a results directory")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write summary.md, summary.csv, paired.csv, report.json and report.html "
                             "(default: the run directory for one run, .llmlab/reports/<timestamp> for several)")
    parser.add_argument("--include-cost-analysis", action="store_true",
                        help="add total cost of ownership, break-even volume and hardware payback")
    parser.add_argument("--monthly-tokens", default=None, help="volume for --include-cost-analysis")


def run_report(args: argparse.Namespace) -> int:
    """``llmlab report``: print the tables and write the re-rendered files."""
    runs = [load_run(Path(p)) for p in args.run_dirs]
    settings = CostSettings.from_json(runs[0].settings.to_json())
    if args.include_cost_analysis:
        settings.include_analysis = True
    if args.monthly_tokens is not None:
        settings.values["monthly_tokens"] = parse_number("monthly_tokens", args.monthly_tokens, "--monthly-tokens")
        settings.sources["monthly_tokens"] = "llmlab report --monthly-tokens"
    report = combined_report(runs, settings)
    scoring = "/".join(sorted({r.scoring for r in runs}))
    print("\n".join(terminal_report(report, scoring)))
    if args.output_dir is not None:
        out = args.output_dir
    else:
        out = runs[0].path if len(runs) == 1 else Path(".llmlab") / "reports" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    written = write_report_files(out, report, ("csv", "markdown", "html"), None)
    written.append(out / "report.json")
    document = {"runs": [str(r.path) for r in runs], "summary": [s.to_json() for s in report.summaries],
                "comparison": report.to_json(), "notes": report.notes}
    atomic_write_text(written[-1], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(f"report: {', '.join(str(p) for p in written)}")
    return 0
