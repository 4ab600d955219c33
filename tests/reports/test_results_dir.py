"""Results directory and controller-side merging, on real TaskSummary objects."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmlab_fixtures.eval.records import ItemRecord, MetricValue, TaskRun
from llmlab_fixtures.eval.summary import SUMMARY_COLUMNS, TaskSummary, percentile, summarize
from llmlab_fixtures.reports.comparison import build_report
from llmlab_fixtures.reports.paired import read_items
from llmlab_fixtures.reports.results_dir import atomic_write_text, summary_csv, write_run
from llmlab_fixtures.run.controller import ResultCollector, merge_items, merge_summaries, summary_property

MODELS = ["llama-cpp:b", "llama-cpp:a", "gpt-4o-mini"]
DATASETS = ["mmlu", "arc_challenge", "gsm8k"]


def _summary(model: str, dataset: str, acc: float = 0.5) -> TaskSummary:
    items = [ItemRecord(model, "llama-cpp", dataset, str(i), 0, 0, True, latency_s=0.1 * (i + 1),
                        prompt_tokens=10, evaluated_tokens=4) for i in range(4)]
    run = TaskRun(model, "llama-cpp", dataset, "loglik", 0, "v1", [MetricValue("acc", acc, 0.1)], items, wall_s=2.0)
    return summarize(run, data_location="in-process", model_info={"name": model}, load={"load_id": model})


def test_summarize_figures() -> None:
    s = _summary("m", "arc_challenge")
    assert (s.n_items, s.items_per_s, s.prompt_tokens, s.evaluated_tokens) == (4, 2.0, 40, 16)
    assert s.latency_p50_s == pytest.approx(0.25) and s.latency_p95_s == pytest.approx(0.385)
    assert s.tokens_per_s == 20.0 and s.evaluated_tokens_per_s == pytest.approx(16 / 1.0)


def test_percentile_matches_numpy_linear() -> None:
    import numpy as np

    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 5, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


@given(st.permutations([(m, d) for m in MODELS for d in DATASETS]), st.integers(1, 4))
def test_merge_is_independent_of_worker_split_and_arrival_order(pairs, workers) -> None:
    summaries = [_summary(m, d) for m, d in pairs]
    collectors = [ResultCollector() for _ in range(workers)]
    for i, s in enumerate(summaries):
        collectors[i % workers].add_report([summary_property(s), ("other", 1)])
    merged = merge_summaries([s for c in collectors for s in c.summaries], MODELS)
    assert [(s.model, s.dataset) for s in merged] == [(m, d) for m in MODELS for d in sorted(DATASETS)]


def test_write_results_contract(tmp_path: Path) -> None:
    summaries = [_summary("llama-cpp:a", "arc_challenge", 0.25)]
    part = tmp_path / "parts" / "main" / "a.jsonl"
    part.parent.mkdir(parents=True)
    part.write_text('{"item_id": "x"}\n')
    summaries[0].items_file = "parts/main/a.jsonl"
    written, _ = write_run(tmp_path, summaries, merge_items(tmp_path, summaries),
                           formats=("csv", "json", "markdown", "html"), config={"limit": 4})
    assert [p.name for p in written] == ["items.jsonl", "summary.csv", "summary.md", "results.json", "report.html"]
    assert (tmp_path / "items.jsonl").read_text() == '{"item_id": "x"}\n'
    with (tmp_path / "summary.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS
        row = next(reader)
    assert (row["metric"], row["value"], row["stderr"], row["n_items"]) == ("acc", "0.25", "0.1", "4")
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["model_loads"] == {"llama-cpp:a": [{"load_id": "llama-cpp:a"}]}
    assert document["versions"]["llama_cpp_python"]
    assert "| arc_challenge (acc) | 0.250 ± 0.100 (2.0 it/s) |" in (tmp_path / "summary.md").read_text()
    report = build_report(summaries, read_items(tmp_path / "items.jsonl"))
    assert summary_csv(summaries, report) == (tmp_path / "summary.csv").read_text()
    assert row["cost_note"].startswith("n/a: this run recorded no energy")  # a summary without energy figures


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(UnicodeEncodeError):  # the write fails half-way, like a full disk would
        atomic_write_text(target, "new" * 10000 + "\ud800")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_model_scope_finds_the_model_in_a_bench_node_id() -> None:
    from llmlab_fixtures.run.scheduling import model_scope

    labels = ["llama-cpp:smollm2-135m", "llama-cpp:smollm2-135m-x", "gpt-4o-mini"]
    assert model_scope("bench/test_arc.py::test_arc[llama-cpp:smollm2-135m-arc_easy]", labels) == labels[0]
    assert model_scope("bench/test_arc.py::test_arc[llama-cpp:smollm2-135m-x-arc_easy]", labels) == labels[1]
    assert model_scope("bench/test_mmlu.py::test_mmlu[gpt-4o-mini]", labels) == "gpt-4o-mini"
    assert model_scope("tests/test_x.py::test_y", labels) is None
