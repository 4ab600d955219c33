"""Run one task on one provider: build each item's requests, score it, stream ItemRecords, aggregate."""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.metrics import (
    acc,
    acc_norm,
    aggregate,
    apply_filter,
    argmax,
    cut_at_stop,
    exact_match,
    mc2,
    normalize_answer,
    normalized_scores,
    parse_choice_letter,
)
from llmlab_fixtures.prompts import (
    ExemplarSampler,
    choice_order,
    generation_request,
    letter_request,
    loglikelihood_requests,
)
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    LoglikelihoodUnsupported,
    Provider,
)
from llmlab_fixtures.records import ItemRecord, TaskRun
from llmlab_fixtures.tasks.definitions import TaskDefinition

Doc = Mapping[str, Any]
T = TypeVar("T")
R = TypeVar("R")


def _score_loglik(task: TaskDefinition, provider: Provider, doc: Doc, requests: list[LoglikelihoodRequest],
                  record: ItemRecord, scored: tuple[list[LoglikelihoodResult], float] | None = None) -> None:
    """Score one item from its choices' log-likelihoods: computed here, or ``scored`` (results, latency) by a
    window call that ran several items at once."""
    choices = task.choices(doc)
    gold = task.target(doc)
    labels = task.labels(doc)
    record.gold = gold
    if scored is None:
        started = time.perf_counter()
        results = provider.loglikelihood(requests)  # all choices at once: the backend shares the context
        record.latency_s = time.perf_counter() - started
    else:
        results, record.latency_s = scored
    if len(results) != len(requests):
        raise RuntimeError(f"provider returned {len(results)} results for {len(requests)} requests")
    lls = [float(r.logprob) for r in results]
    record.loglikelihoods = lls
    record.prompt_tokens = sum(r.context_tokens + r.continuation_tokens for r in results)
    record.evaluated_tokens = sum(r.evaluated_tokens for r in results)
    for spec in task.metrics_for("loglik"):
        if spec.function == "acc":
            record.metrics[spec.name] = acc(lls, gold)
        elif spec.function == "acc_norm":
            record.metrics[spec.name] = acc_norm(lls, choices, gold)
        elif spec.function == "mc2":
            record.metrics[spec.name] = mc2(lls, labels or [])
    primary = next(m for m in task.metrics_for("loglik") if m.name == task.primary_metric_for("loglik"))
    # the prediction is the choice the primary metric picks, so it agrees with `correct`
    scores = normalized_scores(lls, choices) if primary.function == "acc_norm" else lls
    record.prediction = argmax(scores)
    if labels is not None:  # MC2: whether the single most likely answer is a true one
        record.correct = labels[record.prediction] == 1
    else:
        record.correct = record.prediction == gold


def _score_letter(task: TaskDefinition, provider: Provider, doc: Doc, request: GenerationRequest, order: list[int],
                  record: ItemRecord) -> None:
    choices = task.option_texts(doc)
    gold = task.target(doc)
    record.gold = gold
    reply = _generate(provider, request, record)
    position = parse_choice_letter(reply, len(choices))
    record.prediction = None if position is None else order[position]  # index in the original choice order
    record.metrics["acc"] = 1.0 if record.prediction == gold else 0.0
    record.correct = record.prediction == gold


def _score_generation(task: TaskDefinition, provider: Provider, doc: Doc, request: GenerationRequest,
                      record: ItemRecord) -> None:
    target = task.target(doc)
    record.gold = normalize_answer(target, task.exact_match)
    response = _generate(provider, request, record)
    filters = {f.name: f for f in task.filters}
    extracted: dict[str, str] = {}
    for spec in task.metrics:  # all exact_match (checked when the task is loaded)
        answer = apply_filter(response, filters[spec.filter]) if spec.filter else response
        extracted[spec.name] = answer
        record.metrics[spec.name] = exact_match(answer, target, task.exact_match)
    primary = task.primary_metric_for("generate")
    record.prediction = extracted[primary]
    record.correct = record.metrics[primary] == 1.0


def _generate(provider: Provider, request: GenerationRequest, record: ItemRecord) -> str:
    """Run one timed generation, copy its token counts into ``record`` and return the reply cut at a stop."""
    started = time.perf_counter()
    result = provider.generate(request)
    record.latency_s = time.perf_counter() - started
    record.prompt_tokens = result.prompt_tokens
    record.completion_tokens = result.completion_tokens
    record.evaluated_tokens = result.evaluated_tokens
    record.ttft_s = result.ttft_s
    record.response = cut_at_stop(result.text, request.stop)
    return record.response


@dataclass
class ItemPrompt:
    """Everything sent to the model for one item, built before any model call (and hashed for checkpoints)."""

    mode: str
    loglik: list[LoglikelihoodRequest] | None = None
    generation: GenerationRequest | None = None
    order: list[int] | None = None  # letter scoring: display order of the choices

    def digest(self, task: TaskDefinition) -> str:
        """sha256 of the task definition, the scoring method and the exact requests."""
        payload = {"task": repr(replace(task, source=None)), "mode": self.mode, "order": self.order,
                   "loglik": [asdict(r) for r in self.loglik or ()],
                   "generation": asdict(self.generation) if self.generation else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def item_prompt(task: TaskDefinition, mode: str, doc: Doc, exemplars: list[Doc], item_id: str, seed: int,
                ) -> ItemPrompt:
    """The requests one item needs under ``mode``."""
    if mode == "loglik":
        return ItemPrompt(mode, loglik=loglikelihood_requests(task, doc, exemplars))
    if task.is_multiple_choice:
        order = choice_order(task, len(task.option_texts(doc)), item_id, seed)
        return ItemPrompt(mode, generation=letter_request(task, doc, exemplars, order), order=order)
    return ItemPrompt(mode, generation=generation_request(task, doc, exemplars))


class ItemCache(Protocol):
    """Finished items kept across runs (see checkpoint.py); keyed by item id and prompt digest."""

    def lookup(self, item_id: str, digest: str) -> ItemRecord | None: ...

    def save(self, record: ItemRecord, digest: str) -> None: ...


def _score_item(task: TaskDefinition, provider: Provider, mode: str, doc: Doc, exemplars: list[Doc],
                record: ItemRecord, *, seed: int, cache: ItemCache | None = None,
                prepared: tuple[ItemPrompt, tuple[list[LoglikelihoodResult], float] | None] | None = None,
                ) -> ItemRecord:
    """Score one item into ``record``; a provider failure becomes the item's ``error`` instead of a wrong answer.

    With a ``cache``, an item finished by an earlier run with the same prompt is returned as it was. ``prepared``
    is the item's prompt and, when a window call scored it with other items, its results and latency.
    """
    item_started = time.perf_counter()
    digest = None
    try:
        prompt = prepared[0] if prepared else item_prompt(task, mode, doc, exemplars, record.item_id, seed)
        if cache is not None:
            digest = prompt.digest(task)
            if (saved := cache.lookup(record.item_id, digest)) is not None:
                return saved
        if prompt.loglik is not None:
            _score_loglik(task, provider, doc, prompt.loglik, record, prepared[1] if prepared else None)
        elif prompt.order is not None:
            _score_letter(task, provider, doc, prompt.generation, prompt.order, record)
        else:
            _score_generation(task, provider, doc, prompt.generation, record)
    except LoglikelihoodUnsupported as exc:
        raise ConfigError(f"{exc}; use --scoring generate") from exc
    except Exception as exc:  # provider failure (or an unscorable doc): record it, go on
        record.error = f"{type(exc).__name__}: {exc}"
        record.correct = None
        record.metrics = {}
        if not record.latency_s:
            record.latency_s = time.perf_counter() - item_started
        return record  # errors are not checkpointed: a resumed run tries the item again
    if cache is not None and digest is not None:
        cache.save(record, digest)
    return record


Job = tuple[Doc, list[Doc], ItemRecord]


def _score_window(task: TaskDefinition, provider: Provider, jobs: Sequence[Job], *, seed: int,
                  cache: ItemCache | None) -> list[ItemRecord]:
    """Score several log-likelihood items with one provider call (a backend that batches across items).

    Checkpointed items are taken as they were; if the shared call fails, each item is scored on its own, so a
    failure stays with the item that caused it. Each item's latency is the call's time shared out evenly.
    """
    prepared: list[tuple[ItemPrompt, tuple[list[LoglikelihoodResult], float] | None] | None] = []
    pending: list[int] = []
    for i, (doc, exemplars, record) in enumerate(jobs):
        try:
            prompt = item_prompt(task, "loglik", doc, exemplars, record.item_id, seed)
        except Exception:
            prepared.append(None)  # _score_item records the error
            continue
        saved = cache.lookup(record.item_id, prompt.digest(task)) if cache is not None else None
        prepared.append((prompt, None))
        if saved is None:
            pending.append(i)
    if len(pending) > 1:
        requests = [r for i in pending for r in prepared[i][0].loglik]  # type: ignore[index, union-attr]
        try:
            started = time.perf_counter()
            results = provider.loglikelihood(requests)
            share = (time.perf_counter() - started) / len(pending)
        except Exception:
            results = []
        if len(results) == len(requests):
            offset = 0
            for i in pending:
                prompt = prepared[i][0]  # type: ignore[index]
                n = len(prompt.loglik)  # type: ignore[arg-type]
                prepared[i] = (prompt, (results[offset : offset + n], share))
                offset += n
    return [_score_item(task, provider, "loglik", *job, seed=seed, cache=cache, prepared=ready)
            for job, ready in zip(jobs, prepared)]


def _windows(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    window: list[Job] = []
    for job in jobs:
        window.append(job)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _in_order(function: Callable[[T], R], jobs: Iterable[T], concurrency: int) -> Iterator[R]:
    """``map(function, jobs)``, with up to ``concurrency`` calls in flight (threads); results keep the job order."""
    if concurrency <= 1:
        yield from map(function, jobs)
        return
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llmlab-item")
    pending: deque[Future[R]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(function, job))
            if len(pending) >= 2 * concurrency:  # bounded look-ahead: memory stays flat on long runs
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def evaluate(
    task: TaskDefinition,
    provider: Provider,
    docs: Sequence[Doc],
    *,
    model_name: str,
    fewshot_docs: Sequence[Doc] | None,
    scoring: str,
    num_fewshot: int | None,
    seed: int = 1234,
    fixed_fewshot: bool = False,
    on_item: Callable[[ItemRecord], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache: ItemCache | None = None,
) -> TaskRun:
    """Score ``docs`` (prepared by ``datasets.load_docs``) with ``provider`` and aggregate the metrics.

    ``scoring`` picks how multiple-choice items are scored ("loglik" or "generate"); generation tasks
    always generate. ``num_fewshot`` None means the task's default. A provider exception on one item
    is recorded in that item's ``error`` and the run goes on. ``cache`` resumes finished items.
    """
    reason = task.unsupported_reason(scoring)
    if reason:
        raise ConfigError(reason)
    mode = task.effective_scoring(scoring)
    if mode == "loglik" and not provider.supports_loglikelihood:
        raise ConfigError(
            f"backend {provider.backend} returns no prompt log-probabilities, so {task.name} cannot be scored "
            "by log-likelihood; use --scoring generate"
        )
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {shots}")
    sampler = ExemplarSampler(task, fewshot_docs, shots, seed=seed, fixed=fixed_fewshot)
    started = time.perf_counter()

    def jobs() -> Iterator[Job]:
        group_positions: dict[str | None, int] = {}
        for position, doc in enumerate(docs):
            group = task.group(doc) if task.group_field else None
            group_position = group_positions.get(group, 0)
            group_positions[group] = group_position + 1
            record = ItemRecord(model=model_name, backend=provider.backend, dataset=task.name,
                                item_id=task.doc_id(doc, position, group_position), prediction=None, gold=None,
                                correct=None, group=group)
            yield doc, sampler.exemplars(doc), record  # exemplars drawn for every item, in order, as lm-eval does

    def score(job: Job) -> ItemRecord:
        return _score_item(task, provider, mode, *job, seed=seed, cache=cache)

    def scored() -> Iterator[ItemRecord]:
        window = max(1, provider.loglik_items_per_call) if mode == "loglik" else 1
        if window == 1:
            yield from _in_order(score, jobs(), provider.max_concurrency)
            return
        for group in _windows(jobs(), window):
            yield from _score_window(task, provider, group, seed=seed, cache=cache)

    items: list[ItemRecord] = []
    total = len(docs)
    for record in scored():
        items.append(record)
        if on_item is not None:
            on_item(record)
        if progress is not None:
            progress(len(items), total)
    return TaskRun(
        model=model_name,
        backend=provider.backend,
        dataset=task.name,
        scoring=mode,
        num_fewshot=shots,
        prompt_version=task.prompt_version_for(mode),
        metrics=aggregate(task, items, mode),
        items=items,
        wall_s=time.perf_counter() - started,
    )
