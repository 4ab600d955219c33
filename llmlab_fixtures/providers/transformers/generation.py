"""Continuous batching for transformers generation: a fixed set of rows, each refilled as soon as its reply ends.

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

from llmlab_fixtures.providers.base import GenerationResult
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
