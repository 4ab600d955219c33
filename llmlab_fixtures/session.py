"""Worker side: load models, run one dataset on one model, stream items, and hand back a TaskSummary."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab_fixtures.checkpoint import CheckpointStore, TaskCheckpoint, model_fingerprint
from llmlab_fixtures.datasets import load_docs
from llmlab_fixtures.evaluator import evaluate
from llmlab_fixtures.options import RunConfig
from llmlab_fixtures.providers import BackendSettings, Provider, create_provider
from llmlab_fixtures.specs import ModelSpec
from llmlab_fixtures.storage import ItemWriter, part_path
from llmlab_fixtures.summary import TaskSummary, summarize
from llmlab_fixtures.tasks import get_task

LOGLIK_BACKENDS = ("llama-cpp", "transformers")


def worker_id() -> str:
    """``gw0``, ``gw1``... under pytest-xdist, ``main`` otherwise."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def default_threads() -> int:
    """Physical cores split evenly between xdist workers, so threads never oversubscribe the CPU."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, cores // max(1, workers))


def backend_settings(config: RunConfig, threads: int | None = None) -> BackendSettings:
    """The BackendSettings a run's configuration gives every model."""
    return BackendSettings(threads=threads, gpu_layers=config.gpu_layers, seed=config.seed,
                           model_dirs=config.model_dirs, device=config.device, batch_size=config.batch_size,
                           request_timeout=config.request_timeout, max_retries=config.max_retries,
                           concurrency=config.concurrency, max_memory=config.max_memory)


def run_scoring(config: RunConfig) -> str:
    """The multiple-choice method for the whole run: one table never mixes methods."""
    if config.scoring != "auto":
        return config.scoring
    return "loglik" if all(m.backend in LOGLIK_BACKENDS for m in config.models) else "generate"


@dataclass
class LoadedModel:
    """A provider loaded once for this worker, with a record of that load."""

    spec: ModelSpec
    provider: Provider
    load: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # checkpoint key of the weights and numerics (computed on first use)


def load_model(spec: ModelSpec, config: RunConfig) -> LoadedModel:
    """Create and initialise the provider for ``spec`` (the session fixture calls this once per worker)."""
    settings = backend_settings(config, threads=config.threads or default_threads())
    provider = create_provider(spec, settings)
    started = time.perf_counter()
    provider.initialize()
    load = {"load_id": uuid.uuid4().hex[:12], "worker": worker_id(), "pid": os.getpid(),
            "load_s": round(time.perf_counter() - started, 3), "threads": settings.threads}
    return LoadedModel(spec, provider, load)


class BenchSession:
    """Per-process state of a benchmark run: configuration, output location, progress."""

    def __init__(self, config: RunConfig, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.scoring = run_scoring(config)
        self._progress = progress
        self._last_progress = 0.0
        self._store: CheckpointStore | None = None

    def _checkpoint(self, task_name: str, model: LoadedModel) -> TaskCheckpoint | None:
        """The item cache for one (model, dataset), or None under --no-checkpoint."""
        if self.config.checkpoint is None:
            return None
        if self._store is None:
            self._store = CheckpointStore(self.config.checkpoint)
        if model.fingerprint is None:
            model.fingerprint = model_fingerprint(self._store, asdict(model.provider.get_model_info()))
        return TaskCheckpoint(self._store, model.fingerprint, task_name, model=model.spec.label,
                              backend=model.provider.backend, fresh=self.config.fresh)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _report_progress(self, label: str, done: int, total: int, started: float) -> None:
        now = time.perf_counter()
        if self._progress is None or (now - self._last_progress < 10 and done < total):
            return
        self._last_progress = now
        rate = done / (now - started) if now > started else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        self._progress(f"[llmlab] {label}: {done}/{total} items, {rate:.2f} it/s, ETA {eta:.0f}s")

    def unsupported_reason(self, task_name: str) -> str | None:
        """Why ``task_name`` cannot run with this run's scoring method (e.g. mc2 by generation), or None."""
        return get_task(task_name).unsupported_reason(self.scoring)

    def run_task(self, task_name: str, model: LoadedModel) -> TaskSummary:
        """Evaluate ``task_name`` on ``model``; items stream to a part file, the summary is returned."""
        config = self.config
        task = get_task(task_name)
        docs = load_docs(task, config.data_dir)
        if config.limit is not None:
            docs = docs[: config.limit]
        shots = task.num_fewshot if config.num_fewshot is None else config.num_fewshot
        fewshot_docs = load_docs(task, config.data_dir, split=task.fewshot_split) if shots and task.fewshot_split \
            else None
        label = model.spec.label
        relative = part_path(Path("."), worker_id(), label, task.name)
        checkpoint = self._checkpoint(task.name, model)
        writer = ItemWriter(config.output_dir / relative)
        started = time.perf_counter()
        try:
            run = evaluate(
                task, model.provider, docs, model_name=label, fewshot_docs=fewshot_docs, scoring=self.scoring,
                num_fewshot=config.num_fewshot, seed=config.seed, fixed_fewshot=config.fixed_fewshot,
                on_item=writer.write, cache=checkpoint,
                progress=lambda done, total: self._report_progress(f"{label} {task.name}", done, total, started),
            )
        finally:
            writer.close()
        resumed = checkpoint.resumed if checkpoint else 0
        info = asdict(model.provider.get_model_info())
        return summarize(run, data_location=info.get("data_location", "in-process"), model_info=info,
                         load=model.load, primary_metric=task.primary_metric_for(run.scoring),
                         items_file=str(relative), n_resumed=resumed)
