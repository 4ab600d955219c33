"""Continuous batching for llama.cpp generation: several replies side by side, one KV-cache stream each.

Every ``llama_decode`` call carries the next token of every generating stream; a stream whose reply ends (end of
generation, a stop string, its token limit) takes the next prompt at once, and that prompt's prefill goes in the
same round of calls. Replies are byte-identical to generating one prompt at a time, because each stream's logits
do not depend on which other streams share a call (``llama_streams``): every stream decodes at least two tokens a
call (its last cached token again, then the new one) and a call at least ``min_tokens`` in all, so the same CPU
kernels run whatever the number of streams.

A new prompt that shares a long prefix with what another stream holds (fixed few-shot exemplars) copies that
stream's cache instead of evaluating the prefix again; prompts that would share a prefix nobody holds yet wait one
round for the first of them to decode it.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.providers.base import GenerationResult
from llmlab_fixtures.providers.llama_streams import COPY_MIN_TOKENS, LlamaStreams, StreamJob, plan_runs
from llmlab_fixtures.providers.tokens import Reply, common_prefix_length


@dataclass
class PromptJob:
    """One request as tokens: ``prompt`` (already cut to fit the context) and its limits."""

    index: int  # position in the caller's request list
    prompt: list[int]
    max_new: int
    stops: list[str]


@dataclass
class _Slot:
    """The reply a stream is generating: its tokens so far (prompt + generated, the last one not yet decoded)."""

    job: PromptJob
    started: float
    reused: int  # prompt tokens taken from the cache instead of evaluated
    tokens: list[int]
    reply: Reply
    first_token_at: float | None = None
    # bytes of a character cut off by the token limit stay in the decoder and are dropped from the reply
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    def add(self, piece: bytes | None) -> bool:
        """Take the newest token's bytes (None: end of generation); True once the reply has ended."""
        return self.reply.add(None if piece is None else self.reply.text + self.decoder.decode(piece))

    @property
    def prefilling(self) -> bool:
        return self.first_token_at is None


def generate_in_streams(streams: LlamaStreams, jobs: Sequence[PromptJob], *, piece: Callable[[int], bytes | None],
                        min_tokens: int, max_tokens: int, max_rows: int,
                        clock: Callable[[], float] = time.perf_counter,
                        ) -> Iterator[tuple[int, GenerationResult | Exception]]:
    """Greedy replies to ``jobs`` on ``streams``, yielded as each ends: (job index, result). ``piece(token)`` is
    the token's bytes, None for end of generation. A failed llama_decode call fails the replies it carried (the
    exception in place of their result); the rest go on in emptied streams."""
    queue = deque(jobs)
    slots: list[_Slot | None] = [None] * streams.n_streams
    while queue or any(slots):
        _admit(streams, slots, queue, clock)
        busy = [s for s, slot in enumerate(slots) if slot is not None]
        try:
            for segment in _consecutive(busy):
                _decode_segment(streams, slots, segment, min_tokens, max_tokens, max_rows, clock)
        except LlmlabError as exc:
            for s, slot in enumerate(slots):
                if slot is not None:
                    slots[s] = None
                    yield slot.job.index, exc
            continue
        for s, slot in enumerate(slots):
            if slot is not None and not slot.prefilling and slot.reply.reason is None \
                    and not slot.add(piece(slot.tokens[-1])) and len(slot.tokens) >= streams.cells:
                slot.reply.reason = "context"
            if slot is not None and slot.reply.reason is not None:
                slots[s] = None
                yield slot.job.index, _result(slot, clock())


def _admit(streams: LlamaStreams, slots: list[_Slot | None], queue: deque[PromptJob],
           clock: Callable[[], float]) -> None:
    """Give free streams (lowest first, so busy streams stay neighbours) the next prompts, in order; a prompt that
    shares a long prefix with one admitted this round (beyond what any stream holds) waits for it to be decoded,
    and copies it next round."""
    admitted: list[list[int]] = []
    for s in range(streams.n_streams):
        if slots[s] is not None or not queue:
            continue
        job = queue[0]
        held = [min(common_prefix_length(cached, job.prompt), len(job.prompt) - 1) for cached in streams.cached]
        if any(common_prefix_length(job.prompt, other) - max(held) >= COPY_MIN_TOKENS for other in admitted):
            break  # it and the prompts after it wait one round
        queue.popleft()
        reused = _reuse_prefix(streams, s, held)
        slots[s] = _Slot(job, clock(), reused, list(job.prompt), Reply(job.stops, job.max_new))
        admitted.append(job.prompt)


def _reuse_prefix(streams: LlamaStreams, stream: int, held: list[int]) -> int:
    """Prompt tokens ``stream`` keeps, given how many of them each stream holds (``held``, never the whole prompt:
    its last token is decoded for the first logits row): its own, or a longer shared prefix copied from another
    stream's cache."""
    source = max(range(streams.n_streams), key=held.__getitem__)
    if source != stream and held[source] - held[stream] >= COPY_MIN_TOKENS:
        streams.copy_prefix(source, stream, held[source])
        return held[source]
    return held[stream]


def _consecutive(streams: Sequence[int]) -> list[list[int]]:
    """Split sorted stream ids into runs of consecutive ids (llama.cpp puts only such streams in one batch)."""
    runs: list[list[int]] = []
    for s in streams:
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def _decode_segment(streams: LlamaStreams, slots: list[_Slot | None], segment: list[int], min_tokens: int,
                    max_tokens: int, max_rows: int, clock: Callable[[], float]) -> None:
    """One round for neighbouring streams: a prefilling stream decodes its prompt after what it reuses, a
    generating one its last cached token again and the new one; each reads the logits row of its last token."""
    active = [slots[s] for s in segment]
    needs = [len(slot.tokens) - slot.reused if slot.prefilling else 2 for slot in active if slot]
    capacities = [len(slot.tokens) for slot in active if slot]
    for first, end, n_tokens in plan_runs(needs, capacities, [1] * len(needs), min_tokens=min_tokens,
                                          max_tokens=max_tokens, max_rows=max_rows):
        run = [(segment[i], slots[segment[i]]) for i in range(first, end)]
        streams.run([_next_token_job(s, slot, n_tokens) for s, slot in run if slot is not None])
        now = clock()
        for _, slot in run:
            if slot is not None and slot.first_token_at is None:
                slot.first_token_at = now


def _next_token_job(stream: int, slot: _Slot, n_tokens: int) -> StreamJob:
    """Decode the last ``n_tokens`` of the slot's tokens; the argmax of the last row becomes its next token."""
    last = len(slot.tokens) - 1

    def read(_pos: int, row: np.ndarray) -> None:
        slot.tokens.append(int(np.argmax(row)))

    return StreamJob(stream, len(slot.tokens) - n_tokens, slot.tokens[-n_tokens:], {last}, read)


def _result(slot: _Slot, now: float) -> GenerationResult:
    """The slot's reply; times run from when its prompt took the stream."""
    prompt = slot.job.prompt
    first = slot.first_token_at
    return GenerationResult(
        text=slot.reply.text,
        prompt_tokens=len(prompt),
        completion_tokens=slot.reply.n_tokens,
        ttft_s=None if first is None else first - slot.started,
        total_s=now - slot.started,
        evaluated_tokens=len(prompt) - slot.reused,
        extra={"stop_reason": slot.reply.reason, "reused_prompt_tokens": slot.reused},
    )
