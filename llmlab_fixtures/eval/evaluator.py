"""Run one task on one provider: build each item's requests, score it, stream ItemRecords, aggregate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.eval.metrics import (
    MetricTally,
    acc,
    acc_norm,
    apply_filter,
    argmax,
    cut_at_stop,
    exact_match,
    mc2,
    normalize_answer,
    normalized_scores,
    parse_choice_letter,
)
from llmlab_fixtures.eval.prompts import (
    ExemplarSampler,
    choice_order,
    generation_request,
    letter_request,
    loglikelihood_requests,
)
from llmlab_fixtures.eval.records import ItemRecord, ItemTotals, TaskRun
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    LoglikelihoodUnsupported,
    Provider,
)
from llmlab_fixtures.tasks.definitions import TaskDefinition

Doc = Mapping[str, Any]
T = TypeVar("T")
R = TypeVar("R")
Scored = tuple[list[LoglikelihoodResult], float]  # one item's results and its latency (a share of a window call)
Generated = tuple[GenerationResult | Exception, float]  # one item's generation (or failure) in a batch, its latency


def _score_loglik(task: TaskDefinition, provider: Provider, doc: Doc, requests: list[LoglikelihoodRequest],
                  record: ItemRecord, scored: Scored | None = None) -> None:
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
                  record: ItemRecord, generated: Generated | None = None) -> None:
    choices = task.option_texts(doc)
    gold = task.target(doc)
    record.gold = gold
    reply = _generate(provider, request, record, generated)
    position = parse_choice_letter(reply, len(choices))
    record.prediction = None if position is None else order[position]  # index in the original choice order
    record.metrics["acc"] = 1.0 if record.prediction == gold else 0.0
    record.correct = record.prediction == gold


def _score_generation(task: TaskDefinition, provider: Provider, doc: Doc, request: GenerationRequest,
                      record: ItemRecord, generated: Generated | None = None) -> None:
    target = task.target(doc)
    record.gold = normalize_answer(target, task.exact_match)
    response = _generate(provider, request, record, generated)
    filters = {f.name: f for f in task.filters}
    extracted: dict[str, str] = {}
    for spec in task.metrics:  # all exact_match (checked when the task is loaded)
        answer = apply_filter(response, filters[spec.filter]) if spec.filter else response
        extracted[spec.name] = answer
        record.metrics[spec.name] = exact_match(answer, target, task.exact_match)
    primary = task.primary_metric_for("generate")
    record.prediction = extracted[primary]
    record.correct = record.metrics[primary] == 1.0


def _generate(provider: Provider, request: GenerationRequest, record: ItemRecord,
              generated: Generated | None = None) -> str:
    """Run one timed generation (or take ``generated``, from a batch call), copy its token counts into
    ``record`` and return the reply cut at a stop."""
    if generated is None:
        started = time.perf_counter()
        result = provider.generate(request)
        record.latency_s = time.perf_counter() - started
    else:
        result, record.latency_s = generated
        if isinstance(result, Exception):  # this item failed inside a batch that went on for the others
            raise result
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
    _digest: str | None = field(default=None, repr=False, compare=False)

    def digest(self, task: TaskDefinition) -> str:
        """sha256 of the task definition, the scoring method and the exact requests (computed once)."""
        if self._digest is None:
            payload = {"task": repr(replace(task, source=None)), "mode": self.mode, "order": self.order,
                       "loglik": [asdict(r) for r in self.loglik or ()],
                       "generation": asdict(self.generation) if self.generation else None}
            self._digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
        return self._digest


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

    def has(self, item_id: str, digest: str) -> bool: ...

    def lookup(self, item_id: str, digest: str) -> ItemRecord | None: ...

    def save(self, record: ItemRecord, digest: str) -> None: ...


def _score_item(task: TaskDefinition, provider: Provider, mode: str, doc: Doc, exemplars: list[Doc],
                record: ItemRecord, *, seed: int, cache: ItemCache | None = None,
                prepared: tuple[ItemPrompt, Scored | Generated | None] | None = None,
                ) -> ItemRecord:
    """Score one item into ``record``; a provider failure becomes the item's ``error`` instead of a wrong answer.

    With a ``cache``, an item finished by an earlier run with the same prompt is returned as it was. ``prepared``
    is the item's prompt and, when a window call ran it with other items, its results (or generation) and latency.
    """
    item_started = time.perf_counter()
    digest = None
    try:
        prompt = prepared[0] if prepared else item_prompt(task, mode, doc, exemplars, record.item_id, seed)
        if cache is not None:
            digest = prompt.digest(task)
            if (saved := cache.lookup(record.item_id, digest)) is not None:
                return saved
        done = prepared[1] if prepared else None
        if prompt.loglik is not None:
            _score_loglik(task, provider, doc, prompt.loglik, record, done)  # type: ignore[arg-type]
        elif prompt.order is not None:
            _score_letter(task, provider, doc, prompt.generation, prompt.order, record, done)  # type: ignore[arg-type]
        else:
            _score_generation(task, provider, doc, prompt.generation, record, done)  # type: ignore[arg-type]
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
_LOOKAHEAD = 4  # windows read ahead and sorted by length, so each padded batch holds items of similar length


@dataclass
class _WindowItem:
    """One job of a multi-item call, with its prompt (None if building it failed) and, once run, its results."""

    job: Job
    prompt: ItemPrompt | None
    done: Scored | None = None  # log-likelihood results and latency, from a call that ran several items

    @property
    def length(self) -> int:
        """Characters of the item's longest request (a stand-in for its tokens)."""
        if self.prompt is None:
            return 0
        return max((len(r.context) + len(r.continuation) for r in self.prompt.loglik or ()), default=0)


def _run_window(provider: Provider, pending: Sequence[_WindowItem]) -> None:
    """One loglikelihood() call for every pending item's requests; each item gets its results and an even share of
    the call's time. A failed call leaves each item to run on its own."""
    requests = [p.loglik for w in pending if (p := w.prompt) is not None and p.loglik is not None]
    if len(requests) != len(pending):
        return
    try:
        started = time.perf_counter()
        results = provider.loglikelihood([r for item in requests for r in item])
        share = (time.perf_counter() - started) / len(pending)
    except Exception:
        return
    if len(results) != sum(len(item) for item in requests):
        return
    offset = 0
    for w, item in zip(pending, requests):
        w.done = (results[offset : offset + len(item)], share)
        offset += len(item)


def _to_score(task: TaskDefinition, items: Sequence[_WindowItem], cache: ItemCache | None) -> list[int]:
    """Positions of the items the model must run: a prompt was built and no checkpoint holds the item."""
    return [n for n, w in enumerate(items) if w.prompt is not None and (
        cache is None or not cache.has(w.job[2].item_id, w.prompt.digest(task)))]


def _score_window(task: TaskDefinition, provider: Provider, mode: str, window: Sequence[_WindowItem], *, seed: int,
                  cache: ItemCache | None) -> list[ItemRecord]:
    """Score several items' log-likelihoods with one provider call (a backend that batches across items).

    Checkpointed items are taken as they were; if the shared call fails, each item is scored on its own, so a
    failure stays with the item that caused it. Each item's latency is the call's time shared out evenly.
    """
    pending = [window[n] for n in _to_score(task, window, cache)]
    if len(pending) > 1:
        _run_window(provider, pending)
    return [_score_item(task, provider, mode, *w.job, seed=seed, cache=cache,
                        prepared=(w.prompt, w.done) if w.prompt is not None else None) for w in window]


def _windows(jobs: Iterable[T], size: int) -> Iterator[list[T]]:
    window: list[T] = []
    for job in jobs:
        window.append(job)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _window_items(task: TaskDefinition, mode: str, jobs: Sequence[Job], seed: int) -> list[_WindowItem]:
    """Each job with its prompt (None where building it failed: _score_item records the error)."""
    items = []
    for job in jobs:
        doc, exemplars, record = job
        try:
            prompt: ItemPrompt | None = item_prompt(task, mode, doc, exemplars, record.item_id, seed)
        except Exception:
            prompt = None
        items.append(_WindowItem(job, prompt))
    return items


def _scored_in_windows(task: TaskDefinition, provider: Provider, mode: str, jobs: Iterable[Job], size: int, *,
                       seed: int, cache: ItemCache | None) -> Iterator[list[ItemRecord]]:
    """Score log-likelihood items ``size`` per provider call; yields each block's records together, in job order.
    Each block of a few windows is sorted by group (an MMLU subject shares its few-shot block) and length, so a
    call's padded batch wastes little."""
    for block in _windows(jobs, size * _LOOKAHEAD):
        items = _window_items(task, mode, block, seed)
        order = sorted(range(len(items)), key=lambda i: (items[i].job[2].group or "", -items[i].length))
        records: list[ItemRecord | None] = [None] * len(items)
        for chunk in _windows(order, size):
            for i, record in zip(chunk, _score_window(task, provider, mode, [items[i] for i in chunk], seed=seed,
                                                      cache=cache)):
                records[i] = record
        yield [r for r in records if r is not None]


def _generated_in_windows(task: TaskDefinition, provider: Provider, mode: str, jobs: Iterable[Job], size: int, *,
                          seed: int, cache: ItemCache | None) -> Iterator[list[ItemRecord]]:
    """Generate items ``size`` per generate_stream() call (see _generate_window)."""
    for window in _windows(jobs, size):
        yield from _generate_window(task, provider, mode, _window_items(task, mode, window, seed), seed=seed,
                                    cache=cache)


def _generate_window(task: TaskDefinition, provider: Provider, mode: str, items: Sequence[_WindowItem], *,
                     seed: int, cache: ItemCache | None) -> Iterator[list[ItemRecord]]:
    """One generate_stream() call for the items that need the model. Each reply is scored, and so checkpointed, the
    moment the provider yields it (a kill loses only replies still being generated); records are yielded in job
    order as soon as every earlier one is done. If the call fails, what it has not answered runs one at a time."""
    pending = _to_score(task, items, cache)
    waiting = set(pending)
    records: dict[int, ItemRecord] = {}
    next_out = 0

    def ready() -> list[ItemRecord]:
        """Records from ``next_out`` on that are done; items that need no model call are scored here."""
        nonlocal next_out
        out = []
        while next_out < len(items) and next_out not in waiting:
            w = items[next_out]
            out.append(records.pop(next_out, None) or _score_item(
                task, provider, mode, *w.job, seed=seed, cache=cache,
                prepared=(w.prompt, None) if w.prompt is not None else None))
            next_out += 1
        return out

    requests = [p.generation for n in pending if (p := items[n].prompt) is not None and p.generation is not None]
    with contextlib.suppress(Exception):  # the call failed: what it did not answer is scored one at a time
        for i, result in provider.generate_stream(requests):
            n = pending[i]
            latency = 0.0 if isinstance(result, Exception) else result.total_s  # its own time in the batch
            records[n] = _score_item(task, provider, mode, *items[n].job, seed=seed, cache=cache,
                                     prepared=(items[n].prompt, (result, latency)))  # type: ignore[arg-type]
            waiting.discard(n)
            if done := ready():
                yield done
    waiting.clear()
    if done := ready():
        yield done


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
    keep_items: bool = True,
) -> TaskRun:
    """Score ``docs`` (prepared by ``datasets.load_docs``) with ``provider`` and aggregate the metrics.

    ``scoring`` picks how multiple-choice items are scored ("loglik" or "generate"); generation tasks
    always generate. ``num_fewshot`` None means the task's default. A provider exception on one item
    is recorded in that item's ``error`` and the run goes on. ``cache`` resumes finished items.
    Metrics are aggregated as items finish; ``keep_items=False`` keeps no records in memory (they go to
    ``on_item``), so a long run's memory does not grow with its items.
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

    def scored() -> Iterator[list[ItemRecord]]:
        """Records as they finish together: one at a time, or a block of windows at once."""
        window = max(1, provider.loglik_items_per_call if mode == "loglik" else provider.generation_items_per_call)
        if window == 1:
            yield from ([record] for record in _in_order(score, jobs(), provider.max_concurrency))
        elif mode == "loglik":
            yield from _scored_in_windows(task, provider, mode, jobs(), window, seed=seed, cache=cache)
        else:
            yield from _generated_in_windows(task, provider, mode, jobs(), window, seed=seed, cache=cache)

    items: list[ItemRecord] = []
    metrics, totals = MetricTally(task, mode), ItemTotals()
    total = len(docs)
    done = 0
    for finished in scored():
        for record in finished:
            metrics.add(record)
            totals.add(record)
            if keep_items:
                items.append(record)
            if on_item is not None:
                on_item(record)
        done += len(finished)
        if progress is not None:  # once per batch that finished together: its time belongs to all its items
            progress(done, total)
    return TaskRun(
        model=model_name,
        backend=provider.backend,
        dataset=task.name,
        scoring=mode,
        num_fewshot=shots,
        prompt_version=task.prompt_version_for(mode),
        metrics=metrics.results(),
        items=items,
        wall_s=time.perf_counter() - started,
        totals=totals,
    )
