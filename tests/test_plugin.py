"""The plugin as users drive it: pytest runs the real bench modules on the real embedded models (pytester)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llmlab_fixtures.eval.metrics import wilson_interval

SMOLLM = "llama-cpp:smollm2-135m"
GEMMA = "llama-cpp:gemma3-270m"


def _items(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]


def test_one_model_one_dataset_writes_the_results_directory(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge", "--models=local:smollm2-135m", "--limit=4", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines([f"*{SMOLLM} arc_challenge: 4/4 items, *it/s, ETA 0s",
                                 "*llmlab comparison (loglik scoring)*", f"dataset (metric)*{SMOLLM}*",
                                 "arc_challenge (acc_norm)*it/s*", "results: *items.jsonl*"])
    assert sorted(p.name for p in out.iterdir()) == ["items.jsonl", "report.html", "results.json", "summary.csv",
                                                     "summary.md"]
    items = _items(out)
    rows = (data_dir / "arc" / "ARC-Challenge" / "test.jsonl").read_text().splitlines()[:4]
    assert [i["item_id"] for i in items] == [json.loads(row)["id"] for row in rows]
    first = items[0]
    assert {"model", "backend", "dataset", "prediction", "gold", "correct", "loglikelihoods", "latency_s"} <= set(first)
    assert first["model"] == SMOLLM and first["backend"] == "llama-cpp" and first["dataset"] == "arc_challenge"
    assert len(first["loglikelihoods"]) == 4
    assert first["correct"] == (first["prediction"] == first["gold"])
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"}
    acc = next(r for r in rows if r["metric"] == "acc")
    assert float(acc["value"]) == pytest.approx(sum(i["metrics"]["acc"] for i in items) / 4)
    assert acc["n_items"] == "4" and acc["scoring"] == "loglik" and float(acc["items_per_s"]) > 0
    low, high = wilson_interval(int(sum(i["metrics"]["acc"] for i in items)), 4)  # recomputed from items.jsonl
    assert (float(acc["ci95_low"]), float(acc["ci95_high"])) == pytest.approx((low, high))
    results = json.loads((out / "results.json").read_text())
    assert results["models"][SMOLLM]["add_bos_token"] is False
    assert results["config"]["limit"] == 4


def test_k_selects_one_dataset(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    result = bench_pytester.runpytest_subprocess(
        "-k", "gsm8k", "--models=local:smollm2-135m", "--limit=1", f"--data-dir={data_dir}",
        f"--output-dir={bench_pytester.path / 'run'}", "-p", "no:cacheprovider", "-v",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines(["*test_gsm8k.py::test_gsm8k*PASSED*"])
    item = _items(bench_pytester.path / "run")[0]
    assert item["dataset"] == "gsm8k" and item["response"] is not None and item["item_id"] == "0"


def test_xdist_gives_identical_results_and_loads_each_model_once(bench_pytester: pytest.Pytester,
                                                                   data_dir: Path) -> None:
    common = ["-k", "arc_challenge or truthfulqa_mc2", "--models=local:smollm2-135m,local:gemma3-270m",
              "--limit=3", f"--data-dir={data_dir}", "-p", "no:cacheprovider", "--no-checkpoint"]
    serial = bench_pytester.runpytest_subprocess(*common, f"--output-dir={bench_pytester.path / 'serial'}")
    serial.assert_outcomes(passed=4, deselected=10)
    parallel = bench_pytester.runpytest_subprocess(*common, "-n", "2",
                                                   f"--output-dir={bench_pytester.path / 'parallel'}")
    parallel.assert_outcomes(passed=4)
    parallel.stdout.fnmatch_lines(["*same items, model against model*",
                                   f"arc_challenge*{SMOLLM}*{GEMMA}*3*", f"truthfulqa_mc2*{SMOLLM}*{GEMMA}*3*"])
    a, b = _items(bench_pytester.path / "serial"), _items(bench_pytester.path / "parallel")
    key = ("model", "dataset", "item_id", "prediction", "correct")
    assert [tuple(i[k] for k in key) for i in a] == [tuple(i[k] for k in key) for i in b]
    for x, y in zip(a, b):
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-3)
    loads = json.loads((bench_pytester.path / "parallel" / "results.json").read_text())["model_loads"]
    assert sorted(loads) == sorted([SMOLLM, GEMMA])
    assert all(len(v) == 1 for v in loads.values()), loads
    assert {v[0]["worker"] for v in loads.values()} <= {"gw0", "gw1"}
    with (bench_pytester.path / "serial" / "summary.csv").open() as h1, \
            (bench_pytester.path / "parallel" / "summary.csv").open() as h2:
        first = [(r["model"], r["dataset"], r["metric"], r["value"]) for r in csv.DictReader(h1)]
        second = [(r["model"], r["dataset"], r["metric"], r["value"]) for r in csv.DictReader(h2)]
    assert first == second


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models=local:smolm2-135m"], "ERROR: unknown model 'smolm2-135m': did you mean smollm2-135m?*"),
        (["--models=local:qwen-0.5b"], "ERROR: model 'qwen-0.5b' is not available locally; get it with*"),
        (["--data-dir=/nonexistent/data"], "ERROR: data directory /nonexistent/data does not exist;*"),
        (["--export-format=xlsx"],
         "ERROR: --export-format: unknown format xlsx; choose among csv, json, markdown, html"),
        (["--limit=-3"], "ERROR: --limit must be at least 1, got -3"),
        (["--scoring=vibes"], "ERROR: --scoring must be one of auto, loglik, generate, got 'vibes'"),
        (["--max-memory=lots"], "ERROR: --max-memory must be a size such as 8GB or 512MiB, got 'lots'"),
        (["--max-memory=64MB"], "ERROR: model llama-cpp:smollm2-135m needs about 704 MiB but --max-memory is 64 MiB; "
                                "choose a smaller model or quantization, free memory, or raise --max-memory"),
        (["--device=tpu"], "ERROR: --device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--batch-size=0"], "ERROR: --batch-size must be a whole number >= 1 or auto, got '0'"),
        (["--parallel-sequences=0"], "ERROR: --parallel-sequences must be at least 1, got 0"),
        (["--request-timeout=soon"], "ERROR: --request-timeout must be a number of seconds, got 'soon'"),
    ],
)
def test_bad_input_is_one_clear_line(bench_pytester: pytest.Pytester, args: list[str], message: str) -> None:
    result = bench_pytester.runpytest_subprocess(*args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_malformed_row_names_file_and_line(bench_pytester: pytest.Pytester, data_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "data" / "gsm8k"
    broken.mkdir(parents=True)
    rows = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    (broken / "test.jsonl").write_text("\n".join([rows[0], rows[1][:-5], rows[2]]) + "\n")
    (broken / "train.jsonl").write_text((data_dir / "gsm8k" / "train.jsonl").read_text())
    result = bench_pytester.runpytest_subprocess(
        "-k", "gsm8k", "--models=local:smollm2-135m", f"--data-dir={tmp_path / 'data'}",
        f"--output-dir={tmp_path / 'run'}", "-p", "no:cacheprovider",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"*{broken / 'test.jsonl'}:2*"])
    assert "Traceback" not in result.stdout.str()


def test_scoring_generate_letters_the_choices_and_skips_mc2(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge or truthfulqa", "--scoring=generate", "--models=local:smollm2-135m", "--limit=3",
        f"--data-dir={data_dir}", f"--output-dir={out}", "-p", "no:cacheprovider", "-rs",
    )
    result.assert_outcomes(passed=2, skipped=1, deselected=4)
    result.stdout.fnmatch_lines(["*llmlab comparison (generate scoring)*", "SKIPPED*mc2*"])
    items = _items(out)
    assert {i["dataset"] for i in items} == {"arc_challenge", "truthfulqa_mc1"}
    for item in items:
        assert item["loglikelihoods"] is None and isinstance(item["response"], str)
        assert item["correct"] == (item["prediction"] == item["gold"])
    with (out / "summary.csv").open() as handle:
        assert {r["scoring"] for r in csv.DictReader(handle)} == {"generate"}


def test_an_unavailable_model_is_reported_and_the_others_run(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", "--models=local:smollm2-135m,local:qwen-0.5b", "--limit=2", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider", "-n", "2",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # a requested model did not run
    result.assert_outcomes(passed=1)
    line = "skipped llama-cpp:qwen-0.5b: model 'qwen-0.5b' is not available locally; get it with*"
    result.stdout.fnmatch_lines([f"llmlab: {line}", f"dataset (metric)*{SMOLLM}", f"note: {line}"])
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == [SMOLLM]
    assert "qwen-0.5b" in results["config"]["unavailable_models"]["llama-cpp:qwen-0.5b"]
