"""Worker side: load models, run one dataset on one model, stream items, and hand back a TaskSummary."""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.summary import TaskSummary, summarize
from llmlab_fixtures.models.specs import ModelSpec
from llmlab_fixtures.providers import BackendSettings, Provider, create_provider, loglikelihood_unsupported
from llmlab_fixtures.reports.cost import CostSettings
from llmlab_fixtures.reports.energy import measure_energy
from llmlab_fixtures.reports.results_dir import PARTS_DIR, ItemWriter, atomic_write_text, part_path, unload_path
from llmlab_fixtures.run.checkpoint import CheckpointStore, TaskCheckpoint, model_fingerprint
from llmlab_fixtures.run.cores import CoreShare, available_cores
from llmlab_fixtures.run.options import RunConfig
from llmlab_fixtures.run.progress import ProgressEstimate, item_weight
from llmlab_fixtures.tasks import get_task


def worker_id() -> str:
    """``gw0``, ``gw1``... under pytest-xdist, ``main`` otherwise."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def default_threads(in_process_models: int | None = None) -> int:
    """Physical cores (within this process's CPU affinity) split evenly between the xdist workers that run an
    in-process model: each model is pinned to one worker, so ``-n auto`` with one model keeps every core busy
    and threads never oversubscribe the CPU (a worker left alone later takes the others' cores: CoreShare)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if in_process_models:
        workers = min(workers, in_process_models)
    return max(1, available_cores() // max(1, workers))


def backend_settings(config: RunConfig, threads: int | None = None) -> BackendSettings:
    """The BackendSettings a run's configuration gives every model."""
    return BackendSettings(threads=threads, gpu_layers=config.gpu_layers, seed=config.seed,
                           model_dirs=config.model_dirs, device=config.device, batch_size=config.batch_size,
                           parallel_sequences=config.parallel_sequences,
                           request_timeout=config.request_timeout, max_retries=config.max_retries,
                           concurrency=config.concurrency, max_memory=config.max_memory, n_ctx=config.ctx_size,
                           dtype=config.dtype, quantization=config.quantization,
                           preferred_quantization=config.preferred_quantization, scoring=config.scoring)


def run_scoring(config: RunConfig) -> str:
    """The multiple-choice method for the whole run: one table never mixes methods."""
    if config.scoring != "auto":
        return config.scoring
    settings = backend_settings(config)
    return "loglik" if all(loglikelihood_unsupported(m, settings) is None for m in config.models) else "generate"


def loglikelihood_sources(config: RunConfig) -> list[str]:
    """For each served model that may score log-likelihoods: where its scores come from, or why it answers by
    generation instead (said once, in the report header)."""
    if config.scoring == "generate":
        return []
    settings = backend_settings(config)
    lines = []
    for spec in config.models:
        if spec.info.loglik_check:
            why = loglikelihood_unsupported(spec, settings)
            lines.append(f"{spec.label}: log-likelihoods from the server's prompt log-probabilities (probe passed)"
                         if why is None else f"{spec.label}: no log-likelihoods from {why}")
    return lines


@dataclass
class LoadedModel:
    """A provider loaded once for this worker, with a record of that load."""

    spec: ModelSpec
    provider: Provider
    load: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # checkpoint key of the weights and numerics (computed on first use)


def rss_bytes() -> int:
    """This process's resident memory."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def load_model(spec: ModelSpec, config: RunConfig) -> LoadedModel:
    """Create and initialise the provider for ``spec`` (the session fixture calls this once per worker).

    The load record keeps the process RSS before and after loading (``unload_model`` adds it after closing).
    """
    in_process = sum(m.info.in_process for m in config.models)
    settings = backend_settings(config, threads=config.threads or default_threads(in_process))
    provider = create_provider(spec, settings)
    rss_before = rss_bytes()
    started = time.perf_counter()
    provider.initialize()
    load = {"load_id": uuid.uuid4().hex[:12], "worker": worker_id(), "pid": os.getpid(),
            "load_s": round(time.perf_counter() - started, 3), "threads": settings.threads,
            "loaded_at": round(time.time(), 6), "rss_before_load": rss_before, "rss_after_load": rss_bytes()}
    if notice := getattr(provider, "notice", None):  # e.g. GPU offload failed, loaded on the CPU
        load["notice"] = notice
        warnings.warn(f"{spec.label}: {notice}", RuntimeWarning, stacklevel=2)
    return LoadedModel(spec, provider, load)


def unload_model(model: LoadedModel, config: RunConfig) -> dict[str, Any]:
    """Close the model, free what Python still holds of it, and record the RSS after closing."""
    import gc
    import json

    model.provider.close()
    gc.collect()
    record = {"unloaded_at": round(time.time(), 6), "rss_after_close": rss_bytes()}
    if "rss_after_load" in model.load:
        record["rss_released"] = model.load["rss_after_load"] - record["rss_after_close"]
    model.load.update(record)
    if model.load.get("load_id"):
        atomic_write_text(unload_path(config.output_dir, model.load["load_id"]), json.dumps(record))
    return record


class BenchSession:
    """Per-process state of a benchmark run: configuration, output location, progress."""

    def __init__(self, config: RunConfig, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.scoring = run_scoring(config)
        self._progress = progress
        self._last_progress = 0.0
        self._store: CheckpointStore | None = None
        # under xdist with default threads, workers holding in-process models share the cores between them
        shares = "PYTEST_XDIST_WORKER" in os.environ and config.threads is None
        self.cores = CoreShare(config.output_dir / PARTS_DIR / "cores", worker_id()) if shares else None

    def _core_share(self, spec: ModelSpec) -> CoreShare | None:
        """The core share ``spec`` takes part in: an in-process model under xdist with default threads."""
        return self.cores if spec.info.in_process else None

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load ``spec`` for this worker (an in-process model takes its share of the cores)."""
        model = load_model(spec, self.config)
        if (share := self._core_share(spec)) is not None:
            share.join(model.load.get("threads") or 1)
        return model

    def unload(self, model: LoadedModel) -> None:
        """Close ``model``; its cores go to the workers still running one."""
        try:
            unload_model(model, self.config)
        finally:
            if (share := self._core_share(model.spec)) is not None:
                share.leave()

    def _rebalance(self, model: LoadedModel) -> None:
        """Take this worker's current share of the cores (more once other workers have finished)."""
        if (share := self._core_share(model.spec)) is not None:
            threads = share.changed_threads()
            if threads is not None and model.provider.set_threads(threads):
                model.load.setdefault("threads_changed", []).append(threads)

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

    def _on_progress(self, model: LoadedModel, label: str, done: int, estimate: ProgressEstimate, started: float,
                     checkpoint: TaskCheckpoint | None) -> None:
        self._rebalance(model)
        now = time.perf_counter()
        if self._progress is None or (now - self._last_progress < 10 and done < estimate.total):
            return
        self._last_progress = now
        self._progress(estimate.line(label, done, now - started, checkpoint.resumed if checkpoint else 0))

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
        scoring = task.effective_scoring(self.scoring)
        estimate = ProgressEstimate([item_weight(task, doc, scoring) for doc in docs])
        started = time.perf_counter()
        info = asdict(model.provider.get_model_info())
        # a loopback server burns its CPU in another process: estimate from every process's CPU time then
        scope = "machine" if str(info.get("data_location", "")).startswith("loopback") else "process"
        watts = config.cost.cpu_watts if config.cost is not None else CostSettings().cpu_watts
        try:
            with measure_energy(watts, scope=scope) as energy:
                run = evaluate(
                    task, model.provider, docs, model_name=label, fewshot_docs=fewshot_docs, scoring=self.scoring,
                    num_fewshot=config.num_fewshot, seed=config.seed, fixed_fewshot=config.fixed_fewshot,
                    on_item=writer.write, cache=checkpoint, keep_items=False,
                    progress=lambda done, _total: self._on_progress(model, f"{label} {task.name}", done, estimate,
                                                                    started, checkpoint),
                )
        finally:
            writer.close()
        resumed = checkpoint.resumed if checkpoint else 0
        info = asdict(model.provider.get_model_info())
        summary = summarize(run, data_location=info.get("data_location", "in-process"), model_info=info,
                            load=model.load, primary_metric=task.primary_metric_for(run.scoring),
                            items_file=str(relative), n_resumed=resumed)
        summary.energy_cpu_j, summary.energy_gpu_j = energy.cpu_j, energy.gpu_j
        summary.energy_source = energy.cpu_source + (f" + {energy.gpu_source}" if energy.gpu_source else "")
        summary.cpu_s = round(energy.cpu_s, 3)
        return summary
