"""Cost settings and their sources, local and cloud cost, ownership arithmetic, energy meters, McNemar, Pareto."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.reports.comparison import ComparisonRow, mark_pareto, money
from llmlab_fixtures.reports.cost import (
    CostSettings,
    ModelPrice,
    TaskCost,
    cloud_cost,
    local_cost,
    ownership,
    parse_price,
    resolve_cost_settings,
)
from llmlab_fixtures.reports.energy import RaplMeter, measure_energy
from llmlab_fixtures.reports.paired import compare_pairs, mcnemar_exact_p


def _item(prompt: int, completion: int, error: str | None = None) -> dict:
    return {"model": "m", "dataset": "d", "prompt_tokens": prompt, "completion_tokens": completion, "error": error}


def test_settings_precedence_and_sources(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.llmlab]\nelectricity_usd_per_kwh = 0.30\ncpu_watts = 90\nhardware_usd = 3000\n'
                         '[tool.llmlab.models.tiny]\nprice = { input_per_mtok = 1, output_per_mtok = 2 }\n')
    toml = tmp_path / "llmlab.toml"
    toml.write_text('[models.tiny]\nprice = { input_per_mtok = 3, output_per_mtok = 4 }\n')
    settings = resolve_cost_settings({"hardware_usd": "999"}, {"cpu_watts": "40", "hardware_usd": "1"},
                                     pyproject=pyproject, llmlab_toml=toml, cli_prices=["big=5/6"])
    assert settings.electricity_usd_per_kwh == 0.30 and settings.cpu_watts == 40 and settings.hardware_usd == 999
    assert settings.sources == {
        "electricity_usd_per_kwh": "pyproject.toml [tool.llmlab]", "cpu_watts": "ini llmlab_cpu_watts",
        "hardware_usd": "--hardware-price", "hardware_lifetime_hours": "default", "vm_usd_per_hour": "default",
        "monthly_tokens": "default"}
    assert settings.describe("electricity_usd_per_kwh") == "0.3 $/kWh (pyproject.toml [tool.llmlab])"
    assert settings.prices["tiny"] == ModelPrice(3, 4, "llmlab.toml [models.tiny].price")  # llmlab.toml wins
    assert settings.prices["big"].input_per_mtok == 5
    assert CostSettings.from_json(settings.to_json()).to_json() == settings.to_json()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cli": {"electricity_usd_per_kwh": "cheap"}}, "--electricity-price: electricity_usd_per_kwh must be a number"),
    ({"cli": {"hardware_lifetime_hours": "0"}}, "--hardware-lifetime-hours: hardware_lifetime_hours must be positive"),
    ({"cli_prices": ["gpt-4o-mini"]}, "--model-price 'gpt-4o-mini': write MODEL=INPUT/OUTPUT"),
])
def test_bad_settings_name_the_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        resolve_cost_settings(pyproject=tmp_path / "none.toml", llmlab_toml=tmp_path / "none.toml", **kwargs)


def test_a_bad_registry_price_names_the_fix(tmp_path: Path) -> None:
    toml = tmp_path / "llmlab.toml"
    toml.write_text('[models.tiny]\nprice = 3\n')
    with pytest.raises(ConfigError, match=r"llmlab.toml \[models.tiny\].price: write price = \{input_per_mtok"):
        resolve_cost_settings(pyproject=tmp_path / "none.toml", llmlab_toml=toml)


def test_parse_price() -> None:
    assert parse_price("openai-compat:x=0.15/0.6", "--model-price") == (
        "openai-compat:x", ModelPrice(0.15, 0.6, "--model-price openai-compat:x=0.15/0.6"))


def test_cloud_cost_from_genai_prices_per_request() -> None:
    from genai_prices import Usage, calc_price

    items = [_item(100, 20), _item(3000, 7), _item(0, 0, error="TimeoutError")]
    cost = cloud_cost("gpt-4o-mini", "d", "openai", "gpt-4o-mini", items, {})
    expected = sum(float(calc_price(Usage(input_tokens=p, output_tokens=c), "gpt-4o-mini",
                                    provider_id="openai").total_price) for p, c in ((100, 20), (3000, 7)))
    assert cost.cost_usd == pytest.approx(expected) and cost.cost_usd > 0
    assert (cost.tokens, cost.n_items, cost.kind) == (3127, 2, "cloud")
    assert cost.per_1k_tokens == pytest.approx(expected / 3127 * 1000)
    assert "genai-prices" in cost.note


def test_unknown_price_is_na_with_the_reason_never_zero() -> None:
    cost = cloud_cost("openai-compat:mystery", "d", "openai-compat", "mystery-model-7b", [_item(10, 5)], {})
    assert cost.cost_usd is None and cost.per_1k_tokens is None
    assert cost.note.startswith("n/a: genai-prices") and "'mystery-model-7b'" in cost.note
    assert money(cost.cost_usd) == "n/a"


def test_configured_price_wins_and_missing_usage_is_na() -> None:
    prices = {"mystery": ModelPrice(1.0, 3.0, "--model-price mystery=1/3")}
    cost = cloud_cost("openai-compat:mystery", "d", "openai-compat", "x", [_item(1000, 100), _item(500, 50)], prices)
    assert cost.cost_usd == pytest.approx((1500 * 1.0 + 150 * 3.0) / 1e6)
    unreported = cloud_cost("openai-compat:mystery", "d", "openai-compat", "x", [_item(0, 5)], prices)
    assert unreported.cost_usd is None and "no prompt-token usage for 1 of 1" in unreported.note


def test_local_cost_arithmetic() -> None:
    settings = CostSettings()
    settings.values.update(electricity_usd_per_kwh=0.5, hardware_usd=8760.0, hardware_lifetime_hours=8760.0,
                           vm_usd_per_hour=2.0)
    cost = local_cost("m", "d", n_items=10, tokens=2000, wall_s=1800.0, energy_j=7.2e6, energy_source="RAPL",
                      settings=settings)
    assert cost.energy_usd == pytest.approx(1.0)  # 2 kWh × $0.5
    assert cost.hardware_usd == pytest.approx(0.5)  # $1/h × 0.5 h
    assert cost.vm_usd == pytest.approx(1.0)
    assert cost.cost_usd == pytest.approx(1.5) and cost.per_1k_items == pytest.approx(150.0)
    assert "energy 7200000 J [RAPL]" in cost.note
    unknown = local_cost("m", "d", n_items=1, tokens=1, wall_s=1.0, energy_j=None, energy_source=None,
                         settings=settings)
    assert unknown.cost_usd is None and unknown.note.startswith("n/a: this run recorded no energy")


def test_ownership_break_even_and_payback() -> None:
    settings = CostSettings()
    settings.values.update(hardware_usd=7300.0, hardware_lifetime_hours=7300.0, monthly_tokens=1e9)  # $730/month
    local = TaskCost("local", "(all)", "local", 10, 1_000_000, 2.0, "", energy_usd=1.0, wall_s=100.0)
    cloud = TaskCost("cloud", "(all)", "cloud", 10, 1_000_000, 5.0, "")
    row = ownership(local, cloud, settings)
    # energy $1e-6/token, cloud $5e-6/token; capacity 10k tok/s × 3600 × 730 = 2.628e10 tokens: one machine
    assert row.machines == 1
    assert row.cloud_monthly_usd == pytest.approx(5000.0)
    assert row.local_monthly_usd == pytest.approx(1000.0 + 730.0)
    assert row.break_even_tokens == pytest.approx(730.0 / 4e-6)
    assert row.payback_months == pytest.approx(7300.0 / 4000.0)
    dearer = TaskCost("cloud", "(all)", "cloud", 10, 1_000_000, 0.5, "")
    never = ownership(local, dearer, settings)
    assert never.break_even_tokens is None and never.payback_months is None


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 1) == pytest.approx(2 * 7 / 64)
    assert mcnemar_exact_p(1, 5) == mcnemar_exact_p(5, 1)
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(3, 3) == 1.0
    items = [{"model": m, "dataset": "d", "item_id": str(i), "prediction": c, "correct": c, "error": None}
             for i in range(12) for m, c in (("a", True), ("b", i < 2))]
    (pair,) = compare_pairs(items)
    assert (pair.only_a, pair.only_b) == (10, 0) and pair.significant and pair.verdict.startswith("a is better")


def test_pareto_front() -> None:
    def row(model: str, accuracy: float, cost: float | None) -> ComparisonRow:
        task = TaskCost(model, "d", "local", 1000, 1, cost, "")
        return ComparisonRow(model, "d", "acc", accuracy, None, None, 1000, task, None, None, None, None, None)

    rows = [row("cheap", 0.3, 1.0), row("good", 0.6, 5.0), row("worse-and-dearer", 0.5, 6.0),
            row("same-cost-better", 0.4, 1.0), row("unpriced", 0.9, None)]
    mark_pareto(rows)
    assert [r.model for r in rows if r.pareto] == ["good", "same-cost-better"]


def _fake_powercap(root: Path, energy_uj: int, max_uj: int = 1000) -> None:
    for zone in ("intel-rapl:0", "intel-rapl:0:0"):
        (root / zone).mkdir(parents=True, exist_ok=True)
        (root / zone / "energy_uj").write_text(f"{energy_uj}\n")
        (root / zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_counter_with_wraparound(tmp_path: Path) -> None:
    _fake_powercap(tmp_path, 900)
    meter = RaplMeter(tmp_path)
    assert meter.available() and [z.name for z in meter.zones] == ["intel-rapl:0"]  # packages, not subzones
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100\n")  # wrapped past 1000
    assert meter.stop() == pytest.approx(200 / 1e6)


def test_measure_energy_prefers_rapl_and_falls_back_to_the_estimate(tmp_path: Path) -> None:
    _fake_powercap(tmp_path, 0, max_uj=10**12)
    with measure_energy(65.0, powercap_dir=tmp_path, use_nvml=False) as reading:
        (tmp_path / "intel-rapl:0" / "energy_uj").write_text("5000000\n")
    assert reading.cpu_j == pytest.approx(5.0) and reading.cpu_source.startswith("RAPL intel-rapl:0")
    with measure_energy(100.0, powercap_dir=tmp_path / "absent", use_nvml=False) as estimate:
        sum(i * i for i in range(300_000))  # some real CPU work to measure
    assert estimate.cpu_s > 0 and estimate.wall_s > 0
    assert estimate.cpu_j == pytest.approx(100.0 * estimate.cpu_s / (os.cpu_count() or 1))
    assert estimate.cpu_source.startswith("estimate: 100 W × CPU time of this process")
    assert estimate.gpu_j is None and not math.isnan(estimate.total_j)


def test_bad_cost_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--electricity-price=free", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--electricity-price: electricity_usd_per_kwh must be a number, got 'free'*"])


def test_overall_rows_pool_every_dataset() -> None:
    from llmlab_fixtures.eval.metrics import wilson_interval
    from llmlab_fixtures.eval.records import ItemRecord, MetricValue, TaskRun
    from llmlab_fixtures.eval.summary import summarize
    from llmlab_fixtures.reports.comparison import build_report, cost_table

    def summary_and_items(model: str, dataset: str, right: list[bool]) -> tuple:
        items = [ItemRecord(model, "llama-cpp", dataset, str(i), 0, 0, ok, latency_s=0.1 * (i + 1), prompt_tokens=10,
                            completion_tokens=2) for i, ok in enumerate(right)]
        run = TaskRun(model, "llama-cpp", dataset, "generate", 0, "v1",
                      [MetricValue("acc", sum(right) / len(right), 0.1, wilson_interval(sum(right), len(right)))],
                      items, wall_s=2.0)
        summary = summarize(run, data_location="in-process", model_info={}, load={}, primary_metric="acc")
        summary.energy_cpu_j, summary.energy_source = 36.0, "test figure"
        return summary, [i.to_json() for i in items]

    parts = [summary_and_items("a", "arc_easy", [True, True, False, False]),
             summary_and_items("a", "mmlu", [True, False]),
             summary_and_items("b", "arc_easy", [True, False, False, False]),
             summary_and_items("b", "mmlu", [False, False])]
    report = build_report([s for s, _ in parts], [i for _, items in parts for i in items])
    assert report.datasets == ["arc_easy", "mmlu", "(all)"]
    overall = {r.model: r for r in report.overall}
    assert overall["a"].accuracy == pytest.approx(3 / 6)
    assert (overall["a"].ci95_low, overall["a"].ci95_high) == pytest.approx(wilson_interval(3, 6))
    assert overall["a"].cost.tokens == 6 * 12 and overall["a"].cost.energy_j == 72.0
    assert overall["a"].tokens_per_s == pytest.approx(72 / 4.0)
    assert overall["a"].cost.cost_usd == pytest.approx(sum(r.cost.cost_usd for r in report.rows
                                                           if r.model == "a" and r.dataset != "(all)"))
    (pooled,) = report.overall_pairs
    assert (pooled.n, pooled.only_a, pooled.only_b) == (6, 2, 0)
    assert pooled.mcnemar_p == pytest.approx(0.5)
    assert any(line.startswith("(all)") for line in cost_table(report))
