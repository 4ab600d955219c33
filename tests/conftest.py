"""Fixtures shared by the project's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real dataset mirror (../shared/datasets beside the checkout, or $LLMLAB_DATA_DIR)."""
    path = Path(os.environ.get("LLMLAB_DATA_DIR") or REPO.parent / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.fail(f"dataset mirror {path} not found; set LLMLAB_DATA_DIR", pytrace=False)
    return path


@pytest.fixture
def bench_pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory holding copies of the real bench modules."""
    for module in (REPO / "bench").glob("test_*.py"):
        pytester.makepyfile(**{module.stem: module.read_text()})
    return pytester


@pytest.fixture(autouse=True)
def _absolute_data_dir_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """Inner pytest runs start in other directories: hand them the mirror as an absolute path."""
    monkeypatch.setenv("LLMLAB_DATA_DIR", str(data_dir))
