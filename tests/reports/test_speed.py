"""bench/test_speed.py as users run it: llama-bench-style figures through pytest-benchmark, in the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab_fixtures.reports.speed import PP_TOKENS, TG_TOKENS

SMOLLM = "llama-cpp:smollm2-135m"


def test_speed_figures_reach_the_comparison_and_results(speed_pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # under -n, pytest-benchmark would think it is a worker
    out = speed_pytester.path / "run"
    result = speed_pytester.runpytest_subprocess(
        f"--models={SMOLLM}", f"--output-dir={out}", "-p", "no:cacheprovider", "-p", "no:xdist",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*benchmark*", f"dataset (metric)*{SMOLLM}*", "pp512 (tokens/s)*",
                                 "tg128 (tokens/s)*", "ttft (s)*"])
    document = json.loads((out / "results.json").read_text())
    figures = {f["test"]: f for f in document["comparison"]["speed"]}
    assert set(figures) == {"pp512", "tg128", "ttft"}
    assert figures["pp512"]["value"] == pytest.approx(PP_TOKENS / figures["pp512"]["median_s"])
    assert figures["tg128"]["value"] == pytest.approx(TG_TOKENS / figures["tg128"]["median_s"])
    assert figures["pp512"]["min_s"] <= figures["pp512"]["median_s"] <= figures["pp512"]["max_s"]
    assert 0 < figures["ttft"]["value"] < figures["pp512"]["median_s"] * 4  # ~100-token prompt vs 512 tokens
    assert all(f["model"] == SMOLLM and f["rounds"] == 3 and f["threads"] for f in figures.values())
    print(f"\npp512 {figures['pp512']['value']:.0f} tok/s, tg128 {figures['tg128']['value']:.0f} tok/s, "
          f"ttft {figures['ttft']['value'] * 1000:.0f} ms")
    summary = (out / "summary.md").read_text()
    assert "| pp512 (tokens/s) |" in summary


def test_speed_is_skipped_under_xdist_with_the_reason(speed_pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = speed_pytester.runpytest_subprocess(
        f"--models={SMOLLM}", f"--output-dir={tmp_path / 'run'}", "-p", "no:cacheprovider", "-n", "2", "-rs",
    )
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*pytest-benchmark does not run under pytest-xdist*-p no:xdist*"])
