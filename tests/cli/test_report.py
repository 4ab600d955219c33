"""The cost and comparison report end to end: two local models, an OpenAI-compatible server (the loopback Ollama's
/v1, which streams token usage) with a price in the model registry, and a priced cloud API on loopback (Anthropic's
wire format) in one run; every figure in the report is recomputed by hand from items.jsonl; `llmlab report`
re-renders the same tables from the saved runs."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.eval.metrics import wilson_interval
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.testing.anthropic_server import running_anthropic_server
from llmlab_fixtures.testing.ollama_server import running_ollama_server

pytest.importorskip("anthropic")
genai_prices = pytest.importorskip("genai_prices")

COMPAT_TAG = "smollm2:135m"  # the loopback Ollama's tag, as its /v1/models lists it
SMOLLM, GEMMA, COMPAT, CLAUDE = "llama-cpp:smollm2-135m", "llama-cpp:gemma3-270m", f"openai-compat:{COMPAT_TAG}", \
    "claude-3-haiku"
MODELS = [SMOLLM, GEMMA, COMPAT, CLAUDE]
LIMIT = 6
COMPAT_PRICE = (0.15, 0.60)  # $ per million input / output tokens, from llmlab.toml
PYPROJECT = """
[tool.llmlab]
electricity_usd_per_kwh = 0.30
hardware_usd = 2400
monthly_tokens = 50000000
"""
LLMLAB_TOML = f"""
[models."{COMPAT_TAG}"]
display_name = "SmolLM2 behind Ollama's OpenAI-compatible API"
price = {{ input_per_mtok = {COMPAT_PRICE[0]}, output_per_mtok = {COMPAT_PRICE[1]} }}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[dict[str, Path]]:
    """Two saved runs made at different times: the mixed run (A) and a small single-model run (B)."""
    work = tmp_path_factory.mktemp("report-runs")
    bench = Path(__file__).resolve().parents[2] / "bench"
    for module in bench.glob("test_*.py"):
        shutil.copy(module, work / module.name)
    (work / "pyproject.toml").write_text(PYPROJECT)
    (work / "llmlab.toml").write_text(LLMLAB_TOML)
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_API_KEY")}
    env["LLMLAB_DATA_DIR"] = str(data_dir)
    common = ["-p", "no:cacheprovider", "-k", "arc_easy", "--no-checkpoint", f"--data-dir={data_dir}"]
    with running_ollama_server({COMPAT_TAG: embedded_gguf(SMOLLM2)}, num_thread=1) as ollama_url, \
            running_anthropic_server() as anthropic:
        env.update(ANTHROPIC_BASE_URL=anthropic.base_url, ANTHROPIC_API_KEY="sk-ant-test-not-a-real-key")
        models = (f"--models=local:smollm2-135m,local:gemma3-270m,openai-compat:{ollama_url}/v1#{COMPAT_TAG},"
                  "claude-3-haiku")
        live_a = subprocess.run([sys.executable, "-m", "pytest", *common, models, f"--limit={LIMIT}",
                                 "--output-dir=run-a", "--include-cost-analysis", "--html=pytest-report.html",
                                 "--self-contained-html"], cwd=work, env=env, capture_output=True, text=True,
                                timeout=900)
    assert live_a.returncode == 0, live_a.stdout[-4000:] + live_a.stderr[-2000:]
    live_b = subprocess.run([sys.executable, "-m", "pytest", *common, "--models=local:smollm2-135m", "--limit=3",
                             "--scoring=generate",
                             "--output-dir=run-b"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert live_b.returncode == 0, live_b.stdout[-4000:] + live_b.stderr[-2000:]
    (work / "live-a.txt").write_text(live_a.stdout)
    (work / "live-b.txt").write_text(live_b.stdout)
    print(live_a.stdout)  # the figures, for whoever reads the test log (-s)
    yield {"work": work, "a": work / "run-a", "b": work / "run-b"}


def _items(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]


def _rows(run: Path) -> dict[tuple[str, str], dict]:
    document = json.loads((run / "results.json").read_text())
    return {(r["model"], r["dataset"]): r for r in document["comparison"]["rows"]}


def _binomial_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2, computed term by term."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    lower = sum(math.factorial(n) // (math.factorial(i) * math.factorial(n - i)) for i in range(k + 1))
    return min(1.0, 2 * lower / 2**n)


def test_every_format_holds_the_report(runs: dict[str, Path]) -> None:
    run = runs["a"]
    names = {p.name for p in run.iterdir()}
    assert {"items.jsonl", "summary.csv", "paired.csv", "summary.md", "results.json", "report.html"} <= names
    live = (runs["work"] / "live-a.txt").read_text()
    for heading in ("llmlab comparison", "cost / 1K items", "peak memory (MB)",
                    "same items, model against model (exact McNemar test: is the difference real?)",
                    " cost ", "total cost of ownership at 50,000,000 tokens/month"):
        assert heading in live
    # the cost assumptions once, each local model's derivation on one line (the details are in the files)
    assert live.count("electricity_usd_per_kwh") == 1 and live.count("J (CPU-time estimate)") + live.count(
        "J (RAPL") == 2
    # every assumption printed with the source it came from
    assert "electricity_usd_per_kwh = 0.3 $/kWh (pyproject.toml [tool.llmlab])" in live
    assert "cpu_watts = 65 W (default)" in live
    assert (f"price of {COMPAT_TAG}: $0.15 / $0.6 per million input / output tokens "
            f"(llmlab.toml [models.{COMPAT_TAG}].price)") in live
    markdown = (run / "summary.md").read_text()
    for heading in ("## Cost, speed and accuracy", "## Is the difference real?", "## Cost/accuracy Pareto front",
                    "## Total cost of ownership", "### Assumptions"):
        assert heading in markdown
    page = (run / "report.html").read_text()
    assert page.count("<svg") == 3 and "<script" not in page and 'src="http' not in page
    pytest_html = (runs["work"] / "pytest-report.html").read_text()
    assert "Cost, speed and accuracy" in pytest_html and pytest_html.count("<svg") >= 3


def test_costs_agree_with_items_and_settings(runs: dict[str, Path]) -> None:
    run = runs["a"]
    document = json.loads((run / "results.json").read_text())
    rows = _rows(run)
    items = _items(run)
    summaries = {s["model"]: s for s in document["summary"]}
    assert document["versions"]["genai-prices"] == genai_prices.__version__
    # local: measured energy × 0.30 $/kWh (pyproject) + 2400 $ ÷ 26280 h × wall time
    for model in (SMOLLM, GEMMA):
        s = summaries[model]
        energy_j = (s["energy_cpu_j"] or 0) + (s["energy_gpu_j"] or 0)
        assert energy_j > 0 and s["energy_source"]
        expected = energy_j / 3.6e6 * 0.30 + 2400 / 26280 * s["wall_s"] / 3600
        cost = rows[(model, "arc_easy")]["cost"]
        assert cost["cost_usd"] == pytest.approx(expected)
        tokens = s["prompt_tokens"] + s["completion_tokens"]
        assert tokens > 0 and cost["tokens"] == tokens
        assert cost["per_1k_tokens"] == pytest.approx(expected / tokens * 1000)
        assert cost["per_1k_items"] == pytest.approx(expected / LIMIT * 1000)
    # cloud API priced by genai-prices: every request's tokens × the bundled price per million tokens
    from genai_prices import Usage, calc_price

    per_input = float(calc_price(Usage(input_tokens=1_000_000), "claude-3-haiku", provider_id="anthropic").total_price)
    per_output = float(calc_price(Usage(output_tokens=1_000_000), "claude-3-haiku",
                                  provider_id="anthropic").total_price)
    claude = [i for i in items if i["model"] == CLAUDE]
    assert len(claude) == LIMIT and all(i["prompt_tokens"] > 0 for i in claude)
    by_hand = sum(i["prompt_tokens"] * per_input + i["completion_tokens"] * per_output for i in claude) / 1e6
    cost = rows[(CLAUDE, "arc_easy")]["cost"]
    assert cost["cost_usd"] == pytest.approx(by_hand) and cost["cost_usd"] > 0
    assert cost["per_1k_tokens"] == pytest.approx(
        by_hand / sum(i["prompt_tokens"] + i["completion_tokens"] for i in claude) * 1000)
    assert f"genai-prices {genai_prices.__version__}" in cost["note"]
    # the OpenAI-compatible server (Ollama's /v1) streams its usage: every request's tokens × the configured price
    compat_items = [i for i in items if i["model"] == COMPAT]
    assert len(compat_items) == LIMIT and all(i["prompt_tokens"] > 0 and i["completion_tokens"] > 0
                                              for i in compat_items)
    compat_by_hand = sum(i["prompt_tokens"] * COMPAT_PRICE[0] + i["completion_tokens"] * COMPAT_PRICE[1]
                         for i in compat_items) / 1e6
    compat = rows[(COMPAT, "arc_easy")]["cost"]
    assert compat["cost_usd"] == pytest.approx(compat_by_hand) and compat["cost_usd"] > 0
    compat_tokens = sum(i["prompt_tokens"] + i["completion_tokens"] for i in compat_items)
    assert compat["tokens"] == compat_tokens
    assert compat["per_1k_tokens"] == pytest.approx(compat_by_hand / compat_tokens * 1000)
    assert compat["per_1k_items"] == pytest.approx(compat_by_hand / LIMIT * 1000)
    assert f"llmlab.toml [models.{COMPAT_TAG}].price" in compat["note"]
    print(f"{COMPAT}: report ${compat['cost_usd']:.9f}, by hand ${compat_by_hand:.9f} "
          f"({compat_tokens} tokens in {LIMIT} requests)")
    with (run / "summary.csv").open() as handle:
        csv_rows = {(r["model"], r["metric"]): r for r in csv.DictReader(handle)}
    assert float(csv_rows[(CLAUDE, "acc")]["cost_usd"]) == pytest.approx(by_hand)
    assert float(csv_rows[(COMPAT, "acc")]["cost_usd"]) == pytest.approx(compat_by_hand)
    md = (run / "summary.md").read_text()
    assert f"| arc_easy | {COMPAT} | cloud |" in md and "| n/a | n/a | n/a |" not in md


def test_intervals_mcnemar_and_pareto_agree_with_items(runs: dict[str, Path]) -> None:
    run = runs["a"]
    document = json.loads((run / "results.json").read_text())
    rows = _rows(run)
    items = _items(run)
    correct = {m: {i["item_id"]: bool(i["correct"]) for i in items if i["model"] == m and i["error"] is None}
               for m in MODELS}
    for model in MODELS:
        k, n = sum(correct[model].values()), len(correct[model])
        assert n == LIMIT
        row = rows[(model, "arc_easy")]
        assert row["accuracy"] == pytest.approx(k / n)
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(wilson_interval(k, n))
    pairs = {(p["model_a"], p["model_b"]): p for p in document["comparison"]["paired"]}
    assert len(pairs) == 6
    with (run / "paired.csv").open() as handle:
        csv_pairs = {(r["model_a"], r["model_b"]): r for r in csv.DictReader(handle)}
    for (a, b), pair in pairs.items():
        only_a = sum(correct[a][i] and not correct[b][i] for i in correct[a])
        only_b = sum(correct[b][i] and not correct[a][i] for i in correct[a])
        p_value = _binomial_two_sided(min(only_a, only_b), only_a + only_b)
        assert (pair["only_a"], pair["only_b"]) == (only_a, only_b)
        assert pair["mcnemar_p"] == pytest.approx(p_value)
        assert float(csv_pairs[(a, b)]["mcnemar_p"]) == pytest.approx(p_value)
        assert pair["significant"] == (p_value < 0.05)
        print(f"McNemar {a} vs {b}: only A {only_a}, only B {only_b}, p = {p_value:.4g}")
    # Pareto: a priced model is on the front unless another is no dearer and no less accurate (and better in one)
    priced = [r for r in rows.values() if r["dataset"] == "arc_easy" and r["cost"]["per_1k_items"] is not None]
    for row in priced:
        dominated = any(o["cost"]["per_1k_items"] <= row["cost"]["per_1k_items"] and o["accuracy"] >= row["accuracy"]
                        and (o["cost"]["per_1k_items"] < row["cost"]["per_1k_items"]
                             or o["accuracy"] > row["accuracy"]) for o in priced if o is not row)
        assert row["pareto_front"] == (not dominated)
    assert {row["model"] for row in priced} == set(MODELS)  # the OpenAI-compatible server is priced too
    for row in priced:
        print(f"{row['model']}: ${row['cost']['per_1k_tokens']:.6g} per 1K tokens, "
              f"${row['cost']['per_1k_items']:.6g} per 1K items, accuracy {row['accuracy']:.3f}")


def test_cost_of_ownership_by_hand(runs: dict[str, Path]) -> None:
    document = json.loads((runs["a"] / "results.json").read_text())
    rows = _rows(runs["a"])
    ownership = {(o["local_model"], o["cloud_model"]): o for o in document["comparison"]["ownership"]}
    pairs = [(model, cloud_model) for model in (SMOLLM, GEMMA) for cloud_model in (COMPAT, CLAUDE)]
    assert set(ownership) == set(pairs)  # every local model against every priced cloud-style model
    for model, cloud_model in pairs:
        cloud = rows[(cloud_model, "(all)")]["cost"]
        local = rows[(model, "(all)")]["cost"]
        volume = 50_000_000
        energy_per_token = local["energy_usd"] / local["tokens"]
        cloud_per_token = cloud["cost_usd"] / cloud["tokens"]
        capacity = local["tokens"] / local["wall_s"] * 3600 * 730
        machines = max(1, math.ceil(volume / capacity))
        hardware_month = 2400 / (26280 / 730)
        row = ownership[(model, cloud_model)]
        assert row["machines"] == machines
        assert row["cloud_monthly_usd"] == pytest.approx(cloud_per_token * volume)
        assert row["local_monthly_usd"] == pytest.approx(energy_per_token * volume + machines * hardware_month)
        margin = cloud_per_token - energy_per_token
        assert row["break_even_tokens"] == (pytest.approx(hardware_month / margin) if margin > 0 else None)
        savings = cloud_per_token * volume - energy_per_token * volume
        assert row["payback_months"] == (pytest.approx(machines * 2400 / savings) if savings > 0 else None)


def _llmlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_report_command_rerenders_a_saved_run(runs: dict[str, Path]) -> None:
    work = runs["work"]
    done = _llmlab("report", "run-a", "--output-dir", "again", cwd=work)
    assert done.returncode == 0, done.stderr
    live = (work / "live-a.txt").read_text().splitlines()
    shown = done.stdout.splitlines()
    start = next(i for i, line in enumerate(live) if line.startswith("dataset (metric)"))
    table = live[start:start + 4]  # header, rule, arc_easy, data sent to
    assert [line for line in shown if line in table] == table
    cost_lines = [line for line in live for model in MODELS
                  if re.match(rf"{re.escape(model)}: \S+ for \d+ items", line)]
    assert len(cost_lines) == len(MODELS) and all(line in shown for line in cost_lines)
    # the same files, byte for byte, without running any model
    assert (work / "again" / "summary.md").read_text() == (runs["a"] / "summary.md").read_text()
    assert (work / "again" / "summary.csv").read_text() == (runs["a"] / "summary.csv").read_text()
    assert (work / "again" / "paired.csv").read_text() == (runs["a"] / "paired.csv").read_text()
    assert (work / "again" / "report.html").read_text() == (runs["a"] / "report.html").read_text()


def test_report_command_compares_two_runs(runs: dict[str, Path]) -> None:
    work = runs["work"]
    done = _llmlab("report", "run-a", "run-b", "--output-dir", "both", "--include-cost-analysis",
                   "--monthly-tokens", "1000000", cwd=work)
    assert done.returncode == 0, done.stderr
    first, second = f"{SMOLLM} [run-a]", f"{SMOLLM} [run-b]"
    assert f"dataset (metric)  {first}" in done.stdout and second in done.stdout
    document = json.loads((work / "both" / "report.json").read_text())
    pair = next(p for p in document["comparison"]["paired"] if {p["model_a"], p["model_b"]} == {first, second})
    assert pair["n"] == 3  # the items both runs scored
    assert "monthly_tokens = 1,000,000 tokens/month (llmlab report --monthly-tokens)" in done.stdout
    # the table of run B alone is the one its live run printed
    live_b = (work / "live-b.txt").read_text().splitlines()
    cell = next(line for line in live_b if line.startswith("arc_easy (acc)"))[len("arc_easy (acc)"):].strip()
    assert next(line for line in done.stdout.splitlines() if line.startswith("arc_easy (acc)")).endswith(cell)


def test_report_command_bad_directory_is_one_line(tmp_path: Path) -> None:
    done = _llmlab("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"llmlab: {tmp_path / 'nowhere'} is not a results directory (no results.json); give a directory a run wrote "
        "with --export-format including json, e.g. .llmlab/runs/<timestamp>"]
