"""Several sequences decoded side by side, each in a KV-cache stream of its own in one llama.cpp context.

An item's choices are short ``llama_decode`` calls, and on a CPU a call costs about as much again as reading every
weight once (about 11 ms for SmolLM2 on a 2-core VM, against 3 ms a token). Decoding several sequences in one call
removes most calls. They must not share one cache: llama.cpp's CPU attention sums softmax terms in 16-lane chunks of
KV cells, so a sequence's scores move in the last bits with where its cells sit among other sequences' cells (README,
"Where the time goes"). With ``kv_unified`` off every sequence has a stream of its own, laid out as a one-sequence
cache, and its attention reads only that stream: scores equal one-at-a-time decoding bit for bit.

llama.cpp puts several streams in one call only when each decodes the same number of tokens, so a stream whose job is
shorter re-decodes some of its cached tokens (the same K/V and logits again). ``plan_runs`` chooses which neighbouring
streams share a call by weighing those extra tokens against the calls saved. Each stream in a call decodes at least
two tokens: for a stream with one query row ggml's attention takes ``vec_dot`` instead of the sgemm kernel (tinyBLAS
declines a single column), which rounds differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.providers.tokens import common_prefix_length

CALL_COST_TOKENS = 4  # a llama_decode call costs about four tokens' time (weights read once; call_cost.py)
STREAM_MIN_TOKENS = 2  # a stream decoding 1 token in a call gets other attention kernels (ggml's vec_dot, not sgemm)
COPY_MIN_TOKENS = 16  # a shared prefix this long is decoded once and copied to the other streams


def skip_row(_pos: int, _row: np.ndarray) -> None:
    """A job's ``read`` when it wants no logits rows (a prefix decoded only into the cache, a speed probe)."""


@dataclass
class StreamJob:
    """Cut ``stream`` back to its first ``keep`` tokens, decode ``tokens`` after them, and call ``read(position,
    logits row)`` for each position in ``outputs`` (rows are views into llama.cpp's buffer, valid during the call)."""

    stream: int
    keep: int
    tokens: Sequence[int]
    outputs: set[int]
    read: Callable[[int, np.ndarray], None]


def plan_chunks(start: int, n_tokens: int, wanted: set[int], *, n_batch: int, n_outputs_max: int,
                min_decode: int) -> list[tuple[int, int]]:
    """Split tokens [0, n_tokens), the first at position ``start``, into calls of at most ``n_batch`` tokens and
    ``n_outputs_max`` logits rows (positions in ``wanted``); only the last call may be short, and it is lengthened
    to ``min_decode`` tokens where it can be."""
    bounds: list[tuple[int, int]] = []
    i = 0
    while i < n_tokens:
        j, n_out = i, 0
        while j < n_tokens and j - i < n_batch:
            if start + j in wanted:
                if n_out == n_outputs_max:
                    break
                n_out += 1
            j += 1
        bounds.append((i, j))
        i = j
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_decode:
        (a, b), (_, d) = bounds[-2], bounds[-1]
        shift = min(min_decode - (d - b), b - a - min_decode)
        if shift > 0:
            bounds[-2:] = [(a, b - shift), (b - shift, d)]
    return bounds


def plan_runs(needs: Sequence[int], capacities: Sequence[int], rows: Sequence[int], *, min_tokens: int,
              max_tokens: int, max_rows: int, call_cost: float = CALL_COST_TOKENS) -> list[tuple[int, int, int]]:
    """Group streams 0..k-1 into runs of neighbours, one call each, as (first, end, tokens each stream decodes).

    Stream i's next job needs ``needs[i]`` new tokens, may decode up to ``capacities[i]`` (its whole input) and
    reads ``rows[i]`` logits rows. A run of several streams decodes the same count T >= every need, with at least
    ``min_tokens`` in all and STREAM_MIN_TOKENS each, and at most ``max_tokens`` and ``max_rows``; a stream alone
    decodes its need, lengthened to ``min_tokens`` where its input allows, or nothing if it needs nothing (long jobs
    are split into calls later). Minimises calls x ``call_cost`` + tokens decoded."""
    k = len(needs)
    best = [0.0] + [float("inf")] * k
    choice = [0] * (k + 1)
    tokens_each = [0] * (k + 1)
    for end in range(1, k + 1):
        for first in range(end - 1, -1, -1):
            n = end - first
            if n == 1:
                t = min(max(needs[first], min_tokens), capacities[first]) if needs[first] else 0
            else:
                t = max(max(needs[first:end]), -(-min_tokens // n), STREAM_MIN_TOKENS)
                if t > min(capacities[first:end]) or n * t > max_tokens or sum(rows[first:end]) > max_rows:
                    continue
            cost = best[first] + (call_cost + n * t if t else 0)  # t = 0: nothing to decode, no call
            if cost < best[end]:
                best[end], choice[end], tokens_each[end] = cost, first, t
    runs: list[tuple[int, int, int]] = []
    end = k
    while end > 0:
        runs.append((choice[end], end, tokens_each[end]))
        end = choice[end]
    return runs[::-1]


class LlamaStreams:
    """``n_streams`` KV-cache streams of ``cells`` cells each, in one llama.cpp context of ``model`` created with
    ``cparams`` (whose n_ctx, n_seq_max and kv_unified are set here)."""

    def __init__(self, lib: Any, model: Any, cparams: Any, *, n_streams: int, cells: int, n_vocab: int,
                 min_decode: int, describe_error: Callable[[], str] = lambda: "") -> None:
        cparams.n_ctx = n_streams * cells
        cparams.n_seq_max = n_streams
        cparams.kv_unified = False
        self._lib, self.n_streams, self.cells, self.n_vocab = lib, n_streams, cells, n_vocab
        self.n_batch, self.n_outputs_max, self.min_decode = cparams.n_batch, cparams.n_outputs_max, min_decode
        self._describe_error = describe_error
        self._ctx = lib.llama_init_from_model(model, cparams)
        if not self._ctx:
            raise LlmlabError(f"llama.cpp could not create {n_streams} streams of {cells} cells{describe_error()}")
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.cached: list[list[int]] = [[] for _ in range(n_streams)]  # each stream's tokens, positions 0..len-1

    def set_threads(self, threads: int) -> None:
        """Threads for the next calls."""
        self._lib.llama_set_n_threads(self._ctx, threads, threads)

    def clear(self) -> None:
        """Empty every stream."""
        self._lib.llama_memory_clear(self._mem, True)
        self.cached = [[] for _ in range(self.n_streams)]

    def close(self) -> None:
        """Free the batch and the context."""
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = self._batch = self._mem = None

    def spread_prefix(self, inputs: Sequence[Sequence[int]], limit: int) -> int:
        """Before streams 0..k-1 take ``inputs``: decode the prefix they all share (up to ``limit`` tokens, e.g. a
        few-shot block) once, on the stream holding most of it, and copy it to the streams that lack it. Returns
        the tokens decoded."""
        shared = min(limit, *(common_prefix_length(inputs[0], tokens) for tokens in inputs))
        held = [common_prefix_length(self.cached[s], tokens) for s, tokens in enumerate(inputs)]
        lacking = [s for s, have in enumerate(held) if shared - have >= COPY_MIN_TOKENS]
        if len(lacking) < 2:
            return 0
        source = max(range(len(inputs)), key=held.__getitem__)
        decoded = 0
        if held[source] < shared:
            keep = max(0, min(held[source], shared - self.min_decode))
            self.run([StreamJob(source, keep, inputs[source][keep:shared], set(), skip_row)])
            decoded = shared - keep
        for s in lacking:
            if s != source:
                self.copy_prefix(source, s, shared)
        return decoded

    def copy_prefix(self, source: int, target: int, n_tokens: int) -> None:
        """Make ``target`` hold the first ``n_tokens`` of what ``source`` holds (its cells copied, not decoded)."""
        self._lib.llama_memory_seq_cp(self._mem, source, target, -1, -1)  # the whole stream's buffer
        self._lib.llama_memory_seq_rm(self._mem, target, n_tokens, -1)
        self.cached[target] = self.cached[source][:n_tokens]

    def run(self, jobs: Sequence[StreamJob]) -> None:
        """Decode ``jobs``: several jobs (neighbouring streams, the same token count each) in one call; a single
        job in as many calls as n_batch and the logits rows allow."""
        if len(jobs) > 1:
            self._call(jobs)
            return
        job = jobs[0]
        for lo, hi in plan_chunks(job.keep, len(job.tokens), job.outputs, n_batch=self.n_batch,
                                  n_outputs_max=self.n_outputs_max, min_decode=self.min_decode):
            self._call([StreamJob(job.stream, job.keep + lo, job.tokens[lo:hi], job.outputs, job.read)])

    def _call(self, jobs: Sequence[StreamJob]) -> None:
        for job in jobs:
            cached = self.cached[job.stream]
            if job.keep + len(job.tokens) > self.cells:
                raise LlmlabError(f"{job.keep + len(job.tokens)} tokens exceed a stream's {self.cells} cells")
            if len(cached) > job.keep:
                if not self._lib.llama_memory_seq_rm(self._mem, job.stream, job.keep, -1):
                    self.clear()
                    raise LlmlabError("llama.cpp could not cut a KV-cache stream back")
                del cached[job.keep :]
        try:
            decode_jobs(self._lib, self._ctx, self._batch, jobs, self.n_vocab, self._describe_error)
        except LlmlabError:
            self.clear()
            raise
        for job in jobs:
            self.cached[job.stream].extend(job.tokens)


def decode_jobs(lib: Any, ctx: Any, batch: Any, jobs: Sequence[StreamJob], n_vocab: int,
                describe_error: Callable[[], str]) -> None:
    """One llama_decode call of ``jobs`` (job.stream is the sequence id), then each wanted logits row to its job's
    ``read``; LlmlabError if llama.cpp fails (the caller resets its cache)."""
    out_rows: list[tuple[int, int, StreamJob]] = []
    n = 0
    for job in jobs:
        for i, token in enumerate(job.tokens):
            pos = job.keep + i
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0] = job.stream
            batch.logits[n] = pos in job.outputs
            if pos in job.outputs:
                out_rows.append((n, pos, job))
            n += 1
    batch.n_tokens = n
    rc = lib.llama_decode(ctx, batch)
    if rc != 0:
        raise LlmlabError(f"llama_decode failed with code {rc}{describe_error()}")
    for row, pos, job in out_rows:
        ptr = lib.llama_get_logits_ith(ctx, row)
        if not ptr:
            raise LlmlabError(f"llama.cpp returned no logits for position {pos}{describe_error()}")
        job.read(pos, np.ctypeslib.as_array(ptr, shape=(n_vocab,)))
