"""The benchmark suite's conftest: ``-n auto`` starts one xdist worker per model (llmlab_fixtures.run.auto_workers)."""

from llmlab_fixtures.run.auto_workers import pytest_xdist_auto_num_workers  # noqa: F401
