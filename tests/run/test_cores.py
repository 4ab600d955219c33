"""Cores shared between xdist workers: a worker left alone takes the cores of workers that have finished."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import parse_spec
from llmlab_fixtures.run.cores import CoreShare
from llmlab_fixtures.run.options import RunConfig
from llmlab_fixtures.run.worker import BenchSession


@pytest.fixture
def other_worker(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process standing in for another xdist worker that holds a model."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def register(directory: Path, worker: str, pid: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{worker}.pid").write_text(str(pid))


def test_threads_follow_the_workers_still_holding_a_model(tmp_path: Path,
                                                          other_worker: subprocess.Popen[bytes]) -> None:
    share = CoreShare(tmp_path / "cores", "gw0", cores=4, check_every=0)
    share.join(2)
    register(share.directory, "gw1", other_worker.pid)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    register(share.directory, "gw2", int(finished.stdout))  # a worker that died without leaving: not counted
    assert (share.workers(), share.threads()) == (2, 2)
    assert share.changed_threads() is None  # joined with 2 threads: nothing to change
    other_worker.kill()
    other_worker.wait()
    assert (share.workers(), share.threads()) == (1, 4)
    assert share.changed_threads() == 4
    assert share.changed_threads() is None
    share.leave()
    assert not (share.directory / "gw0.pid").exists()


def test_a_worker_left_alone_takes_the_freed_cores(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   other_worker: subprocess.Popen[bytes]) -> None:
    """The session's model runs on half the cores while another worker holds a model, on all of them after."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    spec = parse_spec("local:smollm2-135m", builtin_models())
    config = RunConfig(models=(spec, parse_spec("transformers:smollm2-135m", builtin_models())),
                       output_dir=tmp_path, limit=6, data_dir=data_dir, checkpoint=None)
    session = BenchSession(config)
    assert session.cores is not None
    session.cores.cores, session.cores.check_every = 2, 0  # as on a 2-core machine, checked at every item
    register(session.cores.directory, "gw1", other_worker.pid)
    model = session.load(spec)
    try:
        assert session.cores.workers() == 2
        session.run_task("arc_easy", model)
        assert model.provider.n_threads == 1  # two workers hold a model: one of the 2 cores each
        other_worker.kill()
        other_worker.wait()
        summary = session.run_task("arc_easy", model)
        assert model.provider.n_threads == 2 and model.load["threads_changed"][-1] == 2
        assert summary.n_items == 6 and not summary.n_errors
    finally:
        session.unload(model)
    assert not list(session.cores.directory.glob("gw0.pid"))
