"""Fixtures shared by the project's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch is loaded first in every worker: imported after the other native libraries the suite loads (llama.cpp, the
# cloud SDKs, ...), torch's own init failed in a long-lived xdist worker ("bad call flags") and the worker crashed
# later. Not in LLMLAB_TEST_GPU_LAYERS runs: with torch loaded (2.11+cu130, its own CUDA libraries), a CUDA build of
# llama-cpp-python crashed loading a model onto the GPU (H200); the llama.cpp tests import no torch themselves.
if int(os.environ.get("LLMLAB_TEST_GPU_LAYERS", "0")) == 0:
    import torch  # noqa: F401

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
    """A pytester directory holding copies of the real dataset modules (bench/test_speed.py: speed_pytester)."""
    for module in (REPO / "bench").glob("test_*.py"):
        if module.name == "test_speed.py":
            continue
        pytester.makepyfile(**{module.stem: module.read_text()})
    return pytester


@pytest.fixture
def speed_pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory holding a copy of the real speed module."""
    pytester.makepyfile(test_speed=(REPO / "bench" / "test_speed.py").read_text())
    return pytester


@pytest.fixture(autouse=True)
def _absolute_data_dir_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """Inner pytest runs start in other directories: hand them the mirror as an absolute path."""
    monkeypatch.setenv("LLMLAB_DATA_DIR", str(data_dir))
