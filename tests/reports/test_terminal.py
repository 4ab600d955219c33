"""The terminal summary: one compact table, each model's cost on one line, the assumptions once."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from llmlab_fixtures.eval.records import ItemRecord, MetricValue, TaskRun
from llmlab_fixtures.eval.summary import TaskSummary, summarize
from llmlab_fixtures.reports.comparison import build_report
from llmlab_fixtures.reports.cost import CostSettings, meter_names
from llmlab_fixtures.reports.terminal import WIDTH, terminal_report

ESTIMATE = "estimate: 65 W × CPU time of this process (3.8 s) ÷ 2 cores"


def _run(model: str, dataset: str, right: list[bool]) -> TaskRun:
    items = [ItemRecord(model, "llama-cpp", dataset, str(i), int(ok), 0, ok, latency_s=0.2, prompt_tokens=10)
             for i, ok in enumerate(right)]
    acc = sum(right) / len(right)
    return TaskRun(model, "llama-cpp", dataset, "loglik", 0, "v1", [MetricValue("acc", acc, 0.1)], items, wall_s=4.0)


def _summary(run: TaskRun, energy_j: float) -> TaskSummary:
    summary = summarize(run, data_location="in-process", model_info={"name": run.model}, load={"load_id": run.model})
    summary.energy_cpu_j, summary.energy_source = energy_j, ESTIMATE
    return summary


@pytest.fixture
def lines() -> list[str]:
    runs = [(_run(model, dataset, right), energy)
            for model, right, energy in (("llama-cpp:a", [True, True, False, True], 120.0),
                                         ("llama-cpp:b", [False, True, False, False], 90.0))
            for dataset in ("arc_easy", "mmlu")]
    summaries = [_summary(run, energy) for run, energy in runs]
    items = [asdict(item) for run, _ in runs for item in run.items]
    report = build_report(summaries, items, CostSettings.from_json(None), ["a note"])
    return terminal_report(report, "loglik")


def test_one_comparison_table_with_the_models_overall(lines: list[str]) -> None:
    assert lines[0] == "== llmlab comparison (loglik scoring)"
    header = lines[1].split()
    assert header[:4] == ["dataset", "(metric)", "llama-cpp:a", "llama-cpp:b"]
    rows = {line.split("  ")[0]: line for line in lines}
    assert rows["all datasets (95% CI)"].split()[4:] == ["0.750", "[0.409-0.929]", "0.250", "[0.071-0.591]"]
    assert rows["cost / 1K items"] and rows["peak memory (MB)"]
    assert sum(line.startswith("== ") for line in lines) == 1


def test_each_model_costs_one_line_and_the_assumptions_come_once(lines: list[str]) -> None:
    cost = lines[lines.index("-- cost") + 1:]
    a, b = cost[0], cost[1]
    assert a.startswith("llama-cpp:a: $") and " for 8 items = energy 240 J (CPU-time estimate) $" in a
    assert " + hardware $" in a and a.endswith("for 8.0 s")
    assert b.startswith("llama-cpp:b: ") and "energy 180 J" in b
    total, energy, hardware = (float(part.split("$")[1].split()[0]) for part in
                               (a.split(" for ")[0], a.split("estimate) ")[1], a.split("hardware ")[1]))
    assert total == pytest.approx(energy + hardware, rel=1e-3)
    joined = "\n".join(lines)
    assert joined.count("electricity_usd_per_kwh = 0.15 $/kWh (default)") == 1
    assert "monthly_tokens" not in joined  # only with --include-cost-analysis
    assert all(len(line) <= WIDTH for line in cost[2:] if not line.startswith("note:"))
    assert lines[-1] == "note: a note"


def test_two_models_are_compared_item_by_item(lines: list[str]) -> None:
    start = lines.index("-- same items, model against model (exact McNemar test: is the difference real?)")
    assert lines[start + 1].split()[:5] == ["dataset", "model", "A", "model", "B"]
    arc = lines[start + 3].split()
    assert arc[:4] == ["arc_easy", "llama-cpp:a", "llama-cpp:b", "4"]
    assert arc[4:8] == ["2", "(50%)", "2", "0"]  # same prediction on 2 of 4; only A right on 2; only B on none


def test_energy_meters_are_named_without_their_figures() -> None:
    assert meter_names(ESTIMATE) == "CPU-time estimate"
    assert meter_names("RAPL package-0 (whole CPU package) + NVML energy counter (1 GPU)") == "RAPL + NVML"
    assert meter_names(None) is None
