"""``-n auto`` for benchmark runs: one xdist worker per model, at most one per core, and none for a single model.

llmlab pins each model to one worker, so it loads once per run: workers beyond the number of models would only
start and idle, and with one model a worker adds xdist's start-up (and nothing else) to the same evaluation.
``bench/conftest.py`` imports the hook, so it decides ``pytest bench -n auto`` and leaves other suites in the same
environment to xdist's own rule (one worker per CPU). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still wins when set.
"""

from __future__ import annotations

import os

import pytest

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.run.cores import available_cores

AUTO_WORKERS = pytest.StashKey[int]()


def auto_workers(models: int, cores: int) -> int:
    """xdist workers for ``models`` models on ``cores`` cores: one each, at most one per core, 0 (in-process) for 1."""
    workers = min(models, cores)
    return workers if workers > 1 else 0


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """Workers for ``-n auto`` / ``-n logical``; None leaves the choice to xdist (its variable, or a bad option
    that pytest_configure reports)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from llmlab_fixtures.run.options import build_run_config

    try:
        models = len(build_run_config(config.option).models)
    except LlmlabError:
        return None
    workers = auto_workers(models, available_cores())
    config.stash[AUTO_WORKERS] = workers
    return workers


def auto_workers_line(config: pytest.Config) -> str | None:
    """The report header's account of what ``-n auto`` chose, if it chose here."""
    if AUTO_WORKERS not in config.stash:
        return None
    workers = config.stash[AUTO_WORKERS]
    if workers == 0:
        return "llmlab: -n auto: no xdist workers (one model runs in this process; a worker would only add start-up)"
    return f"llmlab: -n auto: {workers} xdist workers (one per model, at most one per core)"
