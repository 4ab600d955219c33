"""Continuous batching for llama.cpp generation: several replies side by side, one KV-cache stream each.

Each round, one ``llama_decode`` call carries the next token of every generating stream (neighbours, one token
each); a stream whose reply ends (end of generation, a stop string, its token limit) takes the next prompt at once,
and that prompt's prefill is a call of its own in the same round (llama.cpp would split a call mixing one-token
steps with a prompt into equal-length micro-batches anyway). A generating stream decodes one token a call, as
llama.cpp's own generation does (llama-server, Ollama, llama-cpp-python), and its logits do not depend on which
other streams share the call, so replies are byte-identical to one prompt at a time. ``single_token_streams``
checks that on the loaded model and backend before more than one stream is used.

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
from llmlab_fixtures.providers.llama_cpp.streams import COPY_MIN_TOKENS, LlamaStreams, StreamJob, skip_row
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
                        min_tokens: int, max_rows: int, width: int | None = None,
                        clock: Callable[[], float] = time.perf_counter,
                        ) -> Iterator[tuple[int, GenerationResult | Exception]]:
    """Greedy replies to ``jobs`` on ``streams``, yielded as each ends: (job index, result). ``piece(token)`` is
    the token's bytes, None for end of generation. A prompt's prefill decodes at least ``min_tokens`` (reusing less
    of the cache), a call at most ``max_rows`` streams; ``width`` streams are used (all by default). A failed
    llama_decode call fails the replies it carried (the exception in place of their result); the rest go on in
    emptied streams."""
    queue = deque(jobs)
    slots: list[_Slot | None] = [None] * (width or streams.n_streams)
    while queue or any(slots):
        _admit(streams, slots, queue, clock)
        busy = [s for s, slot in enumerate(slots) if slot is not None]
        try:
            for segment in _consecutive(busy):
                _decode_segment(streams, slots, segment, min_tokens, max_rows, clock)
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
    for s in range(len(slots)):
        if slots[s] is not None or not queue:
            continue
        job = queue[0]
        held = [min(common_prefix_length(cached, job.prompt), len(job.prompt) - 1)
                for cached in streams.cached[: len(slots)]]
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
    source = max(range(len(held)), key=held.__getitem__)
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
                    max_rows: int, clock: Callable[[], float]) -> None:
    """One round for neighbouring streams: a prefilling stream decodes its prompt after what it reuses (at least
    ``min_tokens``) in calls of its own, generating streams their newest token in one call (``max_rows`` a call at
    most); each reads the logits row of its last token."""
    runs: list[list[tuple[int, _Slot]]] = []
    for s in segment:
        slot = slots[s]
        if slot is None:
            continue
        if slot.prefilling or not runs or runs[-1][0][1].prefilling or len(runs[-1]) == max_rows:
            runs.append([(s, slot)])
        else:
            runs[-1].append((s, slot))
    for run in runs:
        first = run[0][1]
        n_tokens = min(max(len(first.tokens) - first.reused, min_tokens), len(first.tokens)) if first.prefilling else 1
        streams.run([_next_token_job(s, slot, n_tokens) for s, slot in run])
        now = clock()
        for _, slot in run:
            if slot.first_token_at is None:
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


def single_token_streams(streams: LlamaStreams, context: Sequence[int], token: int) -> int:
    """How many neighbouring streams can take a one-token step in one call with every stream's logits equal, bit for
    bit, to the step taken alone (1 to ``streams.n_streams``). Which kernels ggml runs depends on the number of
    tokens in a call: on the CPU without weight repacking every count passes, but Gemma 3's Q4_K weights repacked
    take a 4-column kernel from 4 tokens on, which changes replies. Every stream first holds ``context``."""
    alone: list[np.ndarray] = []
    at = len(context)

    def keep(rows: list[np.ndarray]) -> Callable[[int, np.ndarray], None]:
        return lambda _pos, row: rows.append(np.array(row))

    streams.run([StreamJob(0, 0, list(context), set(), skip_row)])
    for s in range(1, streams.n_streams):
        streams.copy_prefix(0, s, at)
    streams.run([StreamJob(0, at, [token], {at}, keep(alone))])
    for n in range(2, streams.n_streams + 1):
        together: list[np.ndarray] = []
        streams.run([StreamJob(s, at, [token], {at}, keep(together)) for s in range(n)])
        if not all(np.array_equal(row, alone[0]) for row in together):
            return n - 1
    return streams.n_streams
