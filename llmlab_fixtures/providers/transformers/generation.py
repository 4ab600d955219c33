"""Greedy generation for the transformers provider: the ``GreedyGeneration`` mixin decodes with continuous batching
(``generate_rows``: a fixed set of rows, each refilled as soon as its reply ends) or, for models whose attention
cannot take that cache, with transformers' ``generate()`` on left-padded batches.

``generate()`` on a left-padded batch runs every row until the longest reply is done, copies its whole KV cache
once per new token (``torch.cat``) and checks stop strings after each step; on a CPU the weights are read once per
step however many rows share it (a 135M-parameter model in fp32 is 540 MB a step), so the rows that share a step
are nearly free and the rows that idle are pure loss. Here every prompt is prefilled alone (no padding, the
computation lm-eval's batch size 1 runs), its keys and values land in a row of a preallocated cache
(``SlotCache``), and each step decodes the next token of every busy row with a mask that hides each row's unused
columns. A row whose reply ends takes the next prompt before the following step. A prompt that starts like what a
row already holds (fixed few-shot exemplars) copies that prefix's keys and values and prefills only the rest.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.providers.base import GenerationRequest, GenerationResult
from llmlab_fixtures.providers.tokens import Reply, common_prefix_length

PREFIX_MIN_TOKENS = 16  # a shared prefix shorter than this is prefilled again rather than copied


class SlotCache:
    """Keys and values of up to ``rows`` sequences, sequence r at columns 0..len-1 of row r, allocated per layer on
    first use. It stands in for a transformers Cache: ``update`` writes where ``prefill``/``step`` said and returns
    the keys and values attention reads."""

    is_compileable = False

    def __init__(self, rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self._write: tuple[Any, ...] = ()

    def prefill(self, row: int, start: int) -> None:
        """The next forward pass runs one sequence's tokens from column ``start`` of ``row``."""
        self._write = ("span", row, start)

    def step(self, positions: Any, width: int) -> None:
        """The next forward pass runs one token for each of rows 0..n-1, at column ``positions[r]``; attention
        reads columns 0..width-1."""
        self._write = ("step", positions, width)

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Any, Any]:
        import torch

        if layer_idx == len(self.keys):
            shape = (self.rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros((*shape[:3], value_states.shape[3]), dtype=value_states.dtype,
                                           device=value_states.device))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._write[0] == "span":
            _, row, start = self._write
            end = start + key_states.shape[2]
            keys[row, :, start:end] = key_states[0]
            values[row, :, start:end] = value_states[0]
            return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
        _, positions, width = self._write
        n = positions.shape[0]
        rows = torch.arange(n, device=positions.device)
        keys[rows, :, positions] = key_states[:, :, 0]
        values[rows, :, positions] = value_states[:, :, 0]
        return keys[:n, :, :width], values[:n, :, :width]

    def copy_row(self, source: int, target: int, columns: int) -> None:
        """Row ``target`` takes the first ``columns`` columns of row ``source``."""
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :columns] = keys[source, :, :columns]
            values[target, :, :columns] = values[source, :, :columns]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0  # asked only for a prefill from column 0 (every other pass brings its own 4D mask)

    def get_mask_sizes(self, query: Any, layer_idx: int = 0) -> tuple[int, int]:
        """A prefill from column 0 attends to its own tokens only: plain causal attention."""
        return (query if isinstance(query, int) else int(query.shape[-1])), 0


@dataclass
class PromptRow:
    """A prompt in a cache row: its tokens so far (prompt, then the reply; the last one not yet run)."""

    index: int  # position in the caller's request list
    prompt: list[int]
    reply: Reply
    started: float
    reused: int = 0
    first_token_at: float | None = None
    tokens: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    def add(self, token: int, render: Render) -> None:
        """Append the next token and pass the reply's text on to ``reply``."""
        self.tokens.append(token)
        self.reply.add(render(self.tokens[len(self.prompt) :]))


Forward = Callable[..., Any]  # forward(input_ids, position_ids, mask or None, cache) -> logits of the last positions
Render = Callable[[Sequence[int]], "str | None"]  # a reply's tokens -> its text, None if the last ends generation


def generate_rows(forward: Forward, render: Render, prompts: Sequence[tuple[int, list[int], Reply]], *, rows: int,
                  capacity: int, device: Any, mask_dtype: Any, clock: Callable[[], float] = time.perf_counter,
                  ) -> Iterator[tuple[int, GenerationResult]]:
    """Greedy replies to ``prompts`` ((index, prompt tokens, reply)), ``rows`` at a time; yields (index, result) as
    each ends. ``capacity`` bounds one prompt and its reply; ``mask_dtype`` is torch.bool for SDPA, or a float
    dtype for attention that adds the mask."""
    import torch

    cache = SlotCache(rows, capacity)
    queue = deque(prompts)
    busy: list[PromptRow] = []
    while queue or busy:
        while queue and len(busy) < rows:
            index, prompt, reply = queue.popleft()
            row = PromptRow(index, prompt, reply, clock())
            row.add(_prefill(forward, cache, busy, row, device, mask_dtype), render)
            row.first_token_at = clock()
            busy.append(row)
        for n in reversed([n for n, r in enumerate(busy) if r.reply.reason is not None]):
            finished, last = busy[n], busy[-1]
            if finished is not last:  # the last busy row moves into the freed one: rows 0..k-1 stay the busy ones
                cache.copy_row(len(busy) - 1, n, len(last.tokens) - 1)
                busy[n] = last
            busy.pop()
            yield finished.index, _result(finished, clock())
        if not busy or (queue and len(busy) < rows):
            continue  # refill first, so the next step carries every row
        positions = torch.tensor([len(r.tokens) - 1 for r in busy], device=device)
        width = int(positions.max()) + 1
        cache.step(positions, width)
        visible = torch.arange(width, device=device)[None, :] <= positions[:, None]
        ids = torch.tensor([[r.tokens[-1]] for r in busy], device=device)
        logits = forward(ids, positions[:, None], _as_mask(visible[:, None, None, :], mask_dtype), cache)
        for r, token in zip(busy, logits[:, -1].argmax(dim=-1).tolist()):
            r.add(int(token), render)


def _prefill(forward: Forward, cache: SlotCache, busy: Sequence[PromptRow], row: PromptRow, device: Any,
             mask_dtype: Any) -> int:
    """Run ``row``'s prompt into cache row ``len(busy)`` (after a prefix copied from a busy row that holds it);
    returns its first reply token."""
    import torch

    target = len(busy)
    limit = len(row.prompt) - 1  # the last prompt token always runs: its logits give the first reply token
    shared = [min(common_prefix_length(other.tokens[:-1], row.prompt), limit) for other in busy]
    best = max(range(len(busy)), key=shared.__getitem__, default=None)
    start = 0
    if best is not None and shared[best] >= PREFIX_MIN_TOKENS:
        start = shared[best]
        cache.copy_row(best, target, start)
    row.reused = start
    tokens = row.prompt[start:]
    ids = torch.tensor([tokens], device=device)
    positions = torch.arange(start, len(row.prompt), device=device)[None, :]
    mask = None  # from column 0: plain causal attention, as a batch of one prompt runs it
    if start:
        columns = torch.arange(len(row.prompt), device=device)
        mask = _as_mask((columns[None, :] <= positions[0, :, None])[None, None], mask_dtype)
    cache.prefill(target, start)
    return int(forward(ids, positions, mask, cache)[0, -1].argmax())


def _as_mask(visible: Any, mask_dtype: Any) -> Any:
    """A boolean visibility mask as SDPA takes it (bool), or as an additive float mask."""
    import torch

    if mask_dtype == torch.bool:
        return visible
    return torch.zeros(visible.shape, dtype=mask_dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(mask_dtype).min)


def _result(row: PromptRow, now: float) -> GenerationResult:
    """A finished row's reply; times run from when its prompt took the row."""
    reply = row.reply
    first = row.first_token_at
    return GenerationResult(
        text=reply.text,
        prompt_tokens=len(row.prompt),
        completion_tokens=reply.n_tokens,
        ttft_s=None if first is None else first - row.started,
        total_s=now - row.started,
        evaluated_tokens=len(row.prompt) - row.reused,
        extra={"stop_reason": reply.reason, "reused_prompt_tokens": row.reused},
    )


class _GenerationWatch:
    """A StoppingCriteria for generate() on a padded batch: timestamps the first new token and ends each row's
    Reply (EOG, a stop string or its own limit)."""

    def __init__(self, render: Callable[[Sequence[int]], str | None], prompt_len: int,
                 requests: Sequence[GenerationRequest]) -> None:
        self.render = render
        self.prompt_len = prompt_len
        self.first_token_at: float | None = None
        self.replies = [Reply([s for s in req.stop if s], req.max_new_tokens) for req in requests]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, reply in enumerate(self.replies):
            if reply.reason is None:
                reply.add(self.render(input_ids[row, self.prompt_len :].tolist()))
        return torch.tensor([r.reason is not None for r in self.replies], dtype=torch.bool, device=input_ids.device)


class GreedyGeneration:
    """TransformersProvider's greedy generation (``generate``, ``generate_stream``).

    It relies on the provider's loaded ``_model`` and ``_tokenizer``, its ``device``, ``dtype``, ``max_length``,
    ``pad_id``, ``bos_id``, ``eog_ids``, ``generation_rows``, ``_attention``, ``_cache_kwarg``, ``_continuous``
    (rows refilled as replies end, else left-padded batches) and ``_prefix_token``, and on its ``_require()``,
    ``tokenize()`` and ``generate_batch()``.
    """

    _model: Any
    _tokenizer: Any
    device: str | None
    dtype: Any
    max_length: int
    pad_id: int
    bos_id: int | None
    eog_ids: set[int]
    generation_rows: int
    _attention: str
    _cache_kwarg: str
    _continuous: bool

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Greedy decoding of one request (a batch of one)."""
        return self.generate_batch([request])[0]

    def generate_stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
        """Greedy decoding, ``generation_rows`` prompts at a time, yielded as each reply ends at EOG, a stop string or
        its limit. Each prompt is prefilled alone and its row takes the next prompt as soon as its reply ends
        (transformers_generation); models whose attention cannot take that cache (sliding windows, other kernels)
        generate in left-padded batches instead. Times run from when an item's prompt took its row."""
        self._require()
        active = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        for i, r in enumerate(requests):
            if r.max_new_tokens <= 0:
                yield i, GenerationResult("", len(self.tokenize(r.prompt)), 0, None, 0.0,
                                          extra={"stop_reason": "length"})
        if self._continuous:
            for n, result in self._generate_continuously([requests[i] for i in active]):
                yield active[n], result
            return
        for start in range(0, len(active), self.generation_rows):
            chunk = active[start : start + self.generation_rows]
            yield from zip(chunk, self._generate_rows([requests[i] for i in chunk]))

    def _generation_prompt(self, request: GenerationRequest, max_new: int) -> list[int]:
        """The request's prompt tokens, left-truncated so the prompt and ``max_new`` tokens fit the context."""
        tokens = self.tokenize(request.prompt) or [self._prefix_token]
        return tokens[-(self.max_length - max_new) :]

    def _generate_continuously(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
        import torch

        if not requests:
            return
        prompts = []
        for index, request in enumerate(requests):
            reply = Reply([s for s in request.stop if s], max(1, min(request.max_new_tokens, self.max_length - 1)))
            prompts.append((index, self._generation_prompt(request, reply.limit), reply))
        capacity = max(len(prompt) + reply.limit for _, prompt, reply in prompts) + 1
        mask_dtype = torch.bool if self._attention == "sdpa" else self.dtype
        with torch.inference_mode():  # the cache's tensors are inference tensors: rows are copied in this mode too
            yield from generate_rows(self._forward_rows, self._render, prompts, rows=self.generation_rows,
                                     capacity=capacity, device=self.device, mask_dtype=mask_dtype)

    def _decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _render(self, tokens: Sequence[int]) -> str | None:
        """A reply's text so far; None when its last token ends generation."""
        return None if tokens and tokens[-1] in self.eog_ids else self._decode(tokens)

    def _forward_rows(self, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        """One forward pass through a SlotCache: logits of each row's last position."""
        return self._model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                           logits_to_keep=1, **{self._cache_kwarg: cache}).logits

    def _generate_rows(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        started = time.perf_counter()
        max_new = max(1, min(max(r.max_new_tokens for r in requests), self.max_length - 1))
        prompts = [self._generation_prompt(req, max_new) for req in requests]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, tokens in enumerate(prompts):
            ids[b, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[b, width - len(tokens) :] = 1
        limited = [GenerationRequest(r.prompt, r.stop, min(r.max_new_tokens, max_new)) for r in requests]
        watch = _GenerationWatch(self._render, width, limited)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, pad_token_id=self.pad_id,
                                  eos_token_id=sorted(self.eog_ids) or None, bos_token_id=self.bos_id)
        with torch.inference_mode():
            output = self._model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config, stopping_criteria=StoppingCriteriaList([watch]))
        total = time.perf_counter() - started
        ttft = None if watch.first_token_at is None else watch.first_token_at - started
        results = []
        for b, req in enumerate(limited):
            reply = watch.replies[b]
            if reply.reason is None:  # the batch ended at max_new_tokens before this row's watch saw it finish
                reply.n_tokens, reply.reason = min(len(output[b]) - width, req.max_new_tokens), "length"
                reply.text = self._decode(output[b, width : width + reply.n_tokens].tolist())
            n_tokens, reason, text = reply.n_tokens, reply.reason, reply.text
            results.append(GenerationResult(
                text=text,
                prompt_tokens=len(prompts[b]),
                completion_tokens=n_tokens,
                ttft_s=ttft,
                total_s=total,
                evaluated_tokens=len(prompts[b]),
                extra={"stop_reason": reason, "batch_rows": len(requests)},
            ))
        return results
