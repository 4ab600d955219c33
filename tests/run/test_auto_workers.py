"""``pytest bench -n auto``: one xdist worker per model, at most one per core, none for a single model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab_fixtures.run.auto_workers import auto_workers
from llmlab_fixtures.run.cores import available_cores

REPO = Path(__file__).resolve().parents[2]

WHERE = """
def test_where(model_spec, worker_id):
    print(f"RAN {model_spec.label} ON {worker_id}")
"""


def test_one_worker_per_model_at_most_one_per_core() -> None:
    assert [auto_workers(models, 2) for models in (1, 2, 3)] == [0, 2, 2]
    assert auto_workers(4, 1) == 0 and auto_workers(3, 16) == 3


@pytest.fixture
def bench_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    """A ``bench/`` folder with the real bench conftest and a test that only reports where each model ran."""
    pytester.mkdir("bench")
    (pytester.path / "bench" / "conftest.py").write_text((REPO / "bench" / "conftest.py").read_text())
    (pytester.path / "bench" / "test_where.py").write_text(WHERE)
    return pytester


def _workers(result: pytest.RunResult) -> set[str]:
    return {line.split(" ON ")[1].rstrip(".") for line in result.outlines if "RAN " in line}


def test_one_model_runs_in_process(bench_dir: pytest.Pytester) -> None:
    result = bench_dir.runpytest_subprocess("bench/test_where.py", "-n", "auto", "-s", "--no-checkpoint",
                                            "--models=local:smollm2-135m")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["llmlab: -n auto: no xdist workers (one model runs in this process*"])
    assert _workers(result) == {"master"}


def test_two_models_get_a_worker_each(bench_dir: pytest.Pytester) -> None:
    result = bench_dir.runpytest_subprocess("bench", "-n", "auto", "--no-checkpoint",
                                            "--models=local:smollm2-135m,local:gemma3-270m")
    result.assert_outcomes(passed=2)
    expected = auto_workers(2, available_cores())
    if expected:
        result.stdout.fnmatch_lines([f"llmlab: -n auto: {expected} xdist workers (one per model*",
                                     f"created: {expected}/{expected} workers"])
    else:
        result.stdout.fnmatch_lines(["llmlab: -n auto: no xdist workers*"])


def test_other_suites_keep_xdists_rule(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain(worker_id):\n    assert worker_id.startswith('gw')\n")
    result = pytester.runpytest_subprocess("-n", "auto", "--no-checkpoint")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("llmlab: -n auto*")
