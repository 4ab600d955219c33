"""In-process llama.cpp backend (llama-cpp-python low-level API) with prefix-cache log-likelihood scoring."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from llmlab_fixtures.errors import LlmlabError, ModelUnavailable
from llmlab_fixtures.models.gguf import gguf_metadata
from llmlab_fixtures.models.resources import load_with_cpu_fallback
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)
from llmlab_fixtures.providers.llama_cpp.generation import PromptJob, generate_in_streams, single_token_streams
from llmlab_fixtures.providers.llama_cpp.streams import (
    LlamaStreams,
    StreamJob,
    decode_jobs,
    plan_chunks,
    plan_runs,
    skip_row,
)
from llmlab_fixtures.providers.tokens import common_prefix_length, probe_tokens, split_context

_SEQ = 0  # the single sequence id this provider uses
_DEFAULT_MAX_CTX = 8192
_STREAM_CELLS_STEP = 256  # KV-cache streams are sized to the longest input, rounded up to this
_STREAM_MIN_CELLS = 1024  # ... and hold at least this many tokens, so short tasks never remake them
_WIDTH_PROBE_TOKENS = 16  # context of the check that one-token steps side by side give the logits of one alone
_MIN_DECODE = 8  # tokens per llama_decode call from which CPU kernels give batch-size-independent results
_LOG_LINES: deque[str] = deque(maxlen=32)
_LOG_STATE: dict[str, Any] = {}  # keeps the ctypes log callback alive


def _llama() -> Any:
    """Import llama_cpp's ctypes bindings, or explain how to install them."""
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError as exc:
        raise ModelUnavailable(f"llama-cpp-python is not installed ({exc}); run: pip install llama-cpp-python") from exc
    return lib


def _quiet_llama_logs(lib: Any) -> None:
    """Route llama.cpp/ggml logging to a callback that only remembers recent lines (for our error messages)."""
    if "callback" in _LOG_STATE:
        return

    def on_log(_level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        # level numbers differ between ggml versions (llama-cpp-python's own table is stale), so keep every line
        if text:
            _LOG_LINES.append(text.decode("utf-8", errors="replace").strip())

    callback = lib.llama_log_callback(on_log)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    lib.llama_backend_init()
    _LOG_STATE["callback"] = callback


def _last_llama_error() -> str:
    """The most recent llama.cpp log line that mentions an error, formatted for a message suffix."""
    for line in reversed(_LOG_LINES):
        if "error" in line.lower():
            return f" (llama.cpp: {line})"
    return ""


def _round_cells(tokens: int) -> int:
    """``tokens`` rounded up to a whole number of stream-size steps."""
    return -(-tokens // _STREAM_CELLS_STEP) * _STREAM_CELLS_STEP


def _log_normalizer(row: np.ndarray) -> tuple[float, int]:
    """log(sum(exp(row))) (exponentials in float32, their sum in float64) and the argmax of a logits row."""
    best = int(np.argmax(row))
    top = float(row[best])
    return top + float(np.log(np.exp(row - top).sum(dtype=np.float64))), best


@dataclass
class _Pending:
    """A log-likelihood request as tokens: ``seq`` is context + continuation (left-truncated to n_ctx + 1)."""

    index: int  # position in the caller's request list
    seq: list[int]
    first: int  # the input position whose logits predict the first continuation token
    context_tokens: int
    continuation_tokens: int
    inputs: list[int] = field(init=False)  # the tokens run through the model: all but the last

    def __post_init__(self) -> None:
        self.inputs = self.seq[:-1]


class _GroupScore:
    """Requests that run the same input tokens: the logits rows they read, and their log-probs as rows arrive.

    ``totals`` (request index -> [log-prob, greedy]) is shared by the groups of one call, since a row another group
    decodes first may be read for this group's requests (``share_rows``)."""

    def __init__(self, group: Sequence[_Pending], totals: dict[int, list]) -> None:
        self.group = group
        self.inputs = group[0].inputs
        self.first = min(p.first for p in group)
        self.totals = totals
        self.readers: dict[int, list[tuple[_Pending, int]]] = {}  # position -> (request, target token)
        for p in group:
            totals[p.index] = [0.0, True]
            for pos in range(p.first, len(self.inputs)):
                self.readers.setdefault(pos, []).append((p, p.seq[pos + 1]))

    @property
    def outputs(self) -> set[int]:
        """Input positions whose logits rows this group reads."""
        return set(self.readers)

    @property
    def lowest(self) -> int:
        """The first position this group must decode itself: its first row, or its whole input if it reads none."""
        return min(self.readers, default=len(self.inputs))

    def read(self, pos: int, row: np.ndarray) -> None:
        """Take the logits row of input position ``pos``: one normalizer however many requests read it."""
        lse, best = _log_normalizer(row)
        for p, target in self.readers[pos]:
            total = self.totals[p.index]
            total[0] += float(row[target]) - lse
            total[1] = total[1] and best == target

    def job(self, stream: int, n_tokens: int) -> StreamJob:
        """Decode the last ``n_tokens`` inputs on ``stream``, the earlier ones staying cached there."""
        keep = len(self.inputs) - n_tokens
        return StreamJob(stream, keep, self.inputs[keep:], self.outputs, self.read)

    def results(self, evaluated: int) -> list[tuple[_Pending, LoglikelihoodResult]]:
        """Each request's result; the ``evaluated`` tokens count once, on the first request."""
        return [(p, LoglikelihoodResult(*self.totals[p.index], p.context_tokens, p.continuation_tokens,
                                        evaluated if n == 0 else 0))
                for n, p in enumerate(self.group)]


def share_rows(scores: Sequence[_GroupScore]) -> None:
    """Groups decoded one after another in this order, each after cutting the cache back to what it shares with
    the one before: a row a group shares with earlier inputs (the context's last token, a first word several choices
    start with) is read once, by the group that decodes it, so each distinct token prefix is evaluated once."""
    owner: list[_GroupScore] = []  # the group that last decoded each position of the cached path
    previous: Sequence[int] = ()
    for score in scores:
        shared = common_prefix_length(previous, score.inputs)
        for pos in [pos for pos in score.readers if pos < shared]:
            owner[pos].readers.setdefault(pos, []).extend(score.readers.pop(pos))
        del owner[shared:]
        owner += [score] * (len(score.inputs) - shared)
        previous = score.inputs


class LlamaCppProvider(Provider):
    """A GGUF model loaded in this process; reuses the KV cache across requests that share a token prefix."""

    backend = "llama-cpp"
    supports_loglikelihood = True

    def __init__(
        self,
        model_path: Path,
        name: str,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 1234,
        n_batch: int = 512,
        *,
        reuse_prefix: bool = True,
        n_outputs_max: int = 64,
        flash_attn: bool = False,
        batch_invariant: bool = True,
        parallel: int = 4,
    ) -> None:
        self.model_path = Path(model_path)
        self.name = name
        self.requested_n_ctx = n_ctx
        self.n_threads = n_threads or len(os.sched_getaffinity(0)) or 1
        self.n_gpu_layers = n_gpu_layers
        self.seed = seed  # decoding is greedy; kept for the record
        self.n_batch = n_batch
        self.reuse_prefix = reuse_prefix
        # Scores must not depend on what the cache held before (prefix reuse) or on how tokens were batched.
        # Measured on CPU: flash attention moves ARC log-likelihoods by up to ~1 nat with the batch split;
        # 1-token batches take other kernels (up to 0.3 nat on MMLU); and repacked Q4_K weights (Gemma 3)
        # give results that depend on the batch size below ~8 tokens. batch_invariant turns weight repacking
        # off and decodes at least 8 tokens per call (re-running a few cached tokens if needed).
        self.flash_attn = flash_attn
        self.batch_invariant = batch_invariant
        self._min_decode = _MIN_DECODE if batch_invariant else 1
        self.n_outputs_max = min(n_batch, max(self._min_decode, n_outputs_max))  # logits rows per call (memory)
        # Up to ``parallel`` items are scored side by side, each in a KV-cache stream of its own (llama_streams):
        # fewer calls, the same scores bit for bit. 1 scores one sequence at a time.
        self.parallel = max(1, parallel)
        self._streams: LlamaStreams | None = None
        self._generation_widths: dict[int, int] = {}  # streams -> how many of them generate side by side
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._vocab: Any = None
        self._batch: Any = None
        self._meta: dict[str, Any] | None = None
        self._cached: list[int] = []  # tokens whose K/V sit in the cache at positions 0..len-1
        self.notice: str | None = None  # set when GPU offload failed and the model was loaded on the CPU
        self.n_ctx = 0
        self.n_vocab = 0
        self.add_bos = False
        self.bos_id = -1
        self.eos_id = -1

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF header fields (read without loading the model)."""
        if self._meta is None:
            self._meta = gguf_metadata(self.model_path)
        return self._meta

    def initialize(self) -> None:
        """Check the GGUF, load it with llama.cpp and create a context; ModelUnavailable on failure."""
        if self._ctx is not None:
            return
        meta = self.metadata  # raises ModelUnavailable for missing/garbage/truncated files
        lib = self._lib = _llama()
        _quiet_llama_logs(lib)
        _LOG_LINES.clear()
        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = not self.batch_invariant  # CPU weight repacking only when not batch-invariant

        def load(layers: int) -> Any:
            mparams.n_gpu_layers = 0x7FFFFFFF if layers < 0 else layers
            return lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)

        self._model, self.n_gpu_layers, self.notice = load_with_cpu_fallback(load, self.n_gpu_layers)
        if not self._model:
            self._model = None
            raise ModelUnavailable(f"llama.cpp could not load {self.model_path}{_last_llama_error()}")
        try:
            self._create_context(lib, meta)
        except BaseException:
            self.close()
            raise

    def set_threads(self, threads: int) -> bool:
        """Threads for the next decode calls (prompt and generation alike)."""
        self.n_threads = threads
        if self._ctx is not None:
            self._lib.llama_set_n_threads(self._ctx, threads, threads)
        if self._streams is not None:
            self._streams.set_threads(threads)
        return True

    def _create_context(self, lib: Any, meta: dict[str, Any]) -> None:
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = lib.llama_vocab_bos(self._vocab)
        self.eos_id = lib.llama_vocab_eos(self._vocab)
        trained = lib.llama_model_n_ctx_train(self._model) or meta.get("context_length") or _DEFAULT_MAX_CTX
        n_ctx = self.requested_n_ctx or min(trained, _DEFAULT_MAX_CTX)
        cparams = self._context_params(n_ctx)
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._ctx = None
            raise ModelUnavailable(
                f"llama.cpp could not create a {n_ctx}-token context for {self.model_path}{_last_llama_error()}; "
                "try a smaller n_ctx"
            )
        self.n_ctx = lib.llama_n_ctx(self._ctx)
        self._mem = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._cached = []

    def _context_params(self, n_ctx: int) -> Any:
        """llama.cpp context parameters for one sequence of ``n_ctx`` tokens."""
        lib = self._lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = 1
        cparams.n_outputs_max = self.n_outputs_max
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.swa_full = True  # keep every position so the cache can be cut back to any prefix
        return cparams

    def _streams_for(self, longest: int) -> LlamaStreams | None:
        """``parallel`` KV-cache streams that each hold ``longest`` tokens (made, or remade larger, on first need);
        None when they would need more cells than the main context has."""
        needed = _round_cells(longest)
        if self.parallel * needed > self.n_ctx:
            return None
        try:
            return self._open_streams(self.parallel, max(needed, min(_STREAM_MIN_CELLS, self.n_ctx // self.parallel)))
        except LlmlabError as exc:  # e.g. no memory for a second KV cache: one item at a time, same scores
            self.parallel = 1
            self.notice = f"{exc}; scoring one item at a time"
            return None

    def _open_streams(self, n_streams: int, cells: int) -> LlamaStreams:
        """The provider's streams context with ``n_streams`` streams of at least ``cells`` cells (remade if not)."""
        streams = self._streams
        if streams is None or streams.cells < cells or streams.n_streams != n_streams:
            if streams is not None:
                streams.close()
                self._streams = None
            self._streams = LlamaStreams(self._lib, self._model, self._context_params(self.n_ctx),
                                         n_streams=n_streams, cells=cells, n_vocab=self.n_vocab,
                                         min_decode=self._min_decode, describe_error=_last_llama_error)
        return self._streams

    def close(self) -> None:
        """Free the batch, context and model (the weights' mapping and the KV cache are released)."""
        lib = self._lib
        if lib is None:
            return
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
            self._mem = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None
            self._vocab = None
        self._cached = []

    def __enter__(self) -> LlamaCppProvider:
        self.initialize()
        return self

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down ctypes already
            self.close()

    def _require(self) -> Any:
        if self._ctx is None:
            raise LlmlabError(f"model {self.name} is not loaded; call initialize() first")
        return self._lib

    # --- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Tokenize ``text`` (special tokens not parsed); prepend BOS when the GGUF says add_bos_token."""
        lib = self._require()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, False)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, False)
            if n < 0:
                raise LlmlabError(f"llama.cpp failed to tokenize {len(raw)} bytes")
        tokens = list(buf[:n])
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id >= 0:
            tokens.insert(0, self.bos_id)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        lib = self._require()
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[: max(n, 0)]

    @property
    def _prefix_token(self) -> int:
        """lm-eval's prefix token for an empty context: BOS, else EOS."""
        return self.bos_id if self.bos_id >= 0 else self.eos_id

    # --- KV cache ----------------------------------------------------------------------------

    def reset_cache(self) -> None:
        """Forget everything in the KV cache; the next request is scored from scratch."""
        lib = self._require()
        lib.llama_memory_clear(self._mem, True)
        self._cached = []
        if self._streams is not None:
            self._streams.clear()

    def _keep_prefix(self, tokens: Sequence[int], limit: int) -> int:
        """Cut the cache back to its common prefix with ``tokens`` (at most ``limit``); return what was kept."""
        lib = self._lib
        keep = min(common_prefix_length(self._cached, tokens), limit) if self.reuse_prefix else 0
        if keep == len(self._cached):
            return keep
        if keep == 0 or not lib.llama_memory_seq_rm(self._mem, _SEQ, keep, -1):
            lib.llama_memory_clear(self._mem, True)
            keep = 0
        del self._cached[keep:]
        return keep

    def _decode(
        self, tokens: Sequence[int], outputs: Sequence[int], on_logits: Callable[[int, np.ndarray], None]
    ) -> None:
        """Append ``tokens`` to the cache; call ``on_logits(position, row)`` for each position in ``outputs``.

        Rows are views into llama.cpp's buffer, valid only during the callback.
        """
        start = len(self._cached)
        if start + len(tokens) > self.n_ctx:
            raise LlmlabError(f"{start + len(tokens)} tokens exceed the {self.n_ctx}-token context of {self.name}")
        wanted = set(outputs)
        for lo, hi in plan_chunks(start, len(tokens), wanted, n_batch=self.n_batch,
                                  n_outputs_max=self.n_outputs_max, min_decode=self._min_decode):
            job = StreamJob(_SEQ, start + lo, tokens[lo:hi], wanted, on_logits)
            try:
                decode_jobs(self._lib, self._ctx, self._batch, [job], self.n_vocab,
                            lambda: f" for {self.name}{_last_llama_error()}")
            except LlmlabError:
                self.reset_cache()
                raise
            self._cached.extend(tokens[lo:hi])

    # --- scoring -----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str, contexts: dict[str, list[int]] | None = None
                    ) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split as lm-evaluation-harness 0.4.x splits them."""
        return split_context(context, continuation, self.tokenize, self._prefix_token, contexts)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Sum of continuation log-probs per request; shared token prefixes are evaluated once.

        Requests are scored in lexicographic token order (so equal contexts sit next to each other) and
        returned in the order given; batch-invariant decoding makes the scores independent of that order.
        Requests whose inputs are identical (one-token answers such as MMLU's letters) share one decode and
        read their targets from the same logits rows.
        """
        self._require()
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        pending: list[_Pending] = []
        tokenized: dict[str, list[int]] = {}  # each context once, however many choices share it
        for index, request in enumerate(requests):
            ctx, cont = self.encode_pair(request.context, request.continuation, tokenized)
            seq = (ctx + cont)[-(self.n_ctx + 1) :]  # left-truncate like lm-eval
            n_cont = min(len(cont), len(seq) - 1)
            if n_cont == 0:
                results[index] = LoglikelihoodResult(0.0, True, len(ctx), 0, 0)
                continue
            pending.append(_Pending(index, seq, len(seq) - 1 - n_cont, len(ctx), len(cont)))
        pending.sort(key=lambda p: (p.inputs, p.seq[-1]))
        groups = [list(g) for _, g in groupby(pending, key=lambda p: p.inputs)] if self.reuse_prefix \
            else [[p] for p in pending]
        totals: dict[int, list] = {}
        contexts = [[_GroupScore(g, totals) for g in c]
                    for _, c in groupby(groups, key=lambda g: g[0].inputs[: g[0].first])]
        if self.reuse_prefix:
            for context in contexts:
                share_rows(context)
        streams = self._streams_for(max(len(g[0].inputs) for g in groups) + 1) \
            if self.reuse_prefix and self.parallel > 1 and len(contexts) > 1 else None
        scored = self._score_in_streams(streams, contexts) if streams is not None \
            else [pair for context in contexts for score in context for pair in self._score_input(score)]
        for p, result in scored:
            results[p.index] = result
        return [r for r in results if r is not None]

    def _score_input(self, score: _GroupScore) -> list[tuple[_Pending, LoglikelihoodResult]]:
        """Score requests that run the same input tokens: one decode after the cached prefix, one
        normalizer per logits row however many requests read it."""
        if not score.readers:  # every row it needs was read while an earlier group decoded it
            return score.results(0)
        keep = self._keep_prefix(score.inputs, max(0, min(score.lowest, len(score.inputs) - self._min_decode)))
        self._decode(score.inputs[keep:], sorted(score.outputs), score.read)
        return score.results(len(score.inputs) - keep)

    def _score_in_streams(self, streams: LlamaStreams, contexts: Sequence[Sequence[Sequence[_Pending]]]
                          ) -> list[tuple[_Pending, LoglikelihoodResult]]:
        """Score ``contexts`` (each a list of request groups with one context, in input order) ``parallel`` at a
        time, each context's groups one after another in a KV-cache stream of its own; each call decodes the next
        group of several streams."""
        scored: list[tuple[_Pending, LoglikelihoodResult]] = []
        for wave in range(0, len(contexts), streams.n_streams):
            # the contexts with most groups take the first streams, so the busy streams are always 0..k-1
            queues = [deque(c) for c in sorted(contexts[wave : wave + streams.n_streams], key=len, reverse=True)]
            prefix_tokens = streams.spread_prefix([q[0].inputs for q in queues], min(q[0].first for q in queues))
            wave_start = len(scored)
            while queues and queues[0]:
                busy = [q[0] for q in queues if q]
                needs = [len(score.inputs) - min(common_prefix_length(streams.cached[s], score.inputs), score.lowest)
                         for s, score in enumerate(busy)]
                for first, end, n_tokens in plan_runs(
                        needs, [len(score.inputs) for score in busy], [len(score.readers) for score in busy],
                        min_tokens=self._min_decode, max_tokens=self.n_batch, max_rows=self.n_outputs_max):
                    run = busy[first:end]
                    if n_tokens:  # 0: nothing left to decode, its rows were read by earlier groups
                        streams.run([score.job(s, n_tokens) for s, score in enumerate(run, first)])
                    scored += [pair for score in run for pair in score.results(n_tokens)]
                for queue in queues[: len(busy)]:
                    queue.popleft()
            scored[wave_start][1].evaluated_tokens += prefix_tokens  # the shared prefix counts once, on the first
        return scored

    # --- generation --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Greedy decoding of one prompt (a batch of one; see generate_stream)."""
        result = self.generate_batch([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def generate_stream(self, requests: Sequence[GenerationRequest]
                        ) -> Iterator[tuple[int, GenerationResult | Exception]]:
        """Greedy decoding, ``parallel`` prompts side by side in KV-cache streams (llama_generation), yielded as each
        reply ends: each stops at end-of-generation, its first stop string or max_new_tokens, and its stream takes the
        next prompt at once. Replies are the same for any stream count. A failed item yields its exception."""
        self._require()
        jobs: list[PromptJob] = []
        for index, request in enumerate(requests):
            try:
                job = self._prompt_job(index, request)
            except Exception as exc:  # an item that cannot be prepared fails alone
                yield index, exc
                continue
            if job.max_new > 0:
                jobs.append(job)
            else:
                yield index, GenerationResult("", len(job.prompt), 0, None, 0.0, extra={"stop_reason": "length"})
        if jobs:
            streams = self._generation_streams(max(len(job.prompt) + job.max_new for job in jobs))
            yield from generate_in_streams(streams, jobs, piece=self._piece, min_tokens=self._min_decode,
                                           max_rows=self.n_outputs_max, width=self._generation_width(streams))

    def _prompt_job(self, index: int, request: GenerationRequest) -> PromptJob:
        """The request's prompt tokens, left-truncated so prompt and reply fit the context."""
        prompt = self.tokenize(request.prompt) or [self._prefix_token]
        max_new = min(request.max_new_tokens, self.n_ctx - 1)
        if max_new > 0:
            prompt = prompt[-(self.n_ctx - max_new) :]
        return PromptJob(index, prompt, max_new, [s for s in request.stop if s])

    def _piece(self, token: int) -> bytes | None:
        """A generated token's bytes; None for an end-of-generation token."""
        return None if self._lib.llama_vocab_is_eog(self._vocab, token) else self.token_bytes(token)

    def _generation_streams(self, longest: int) -> LlamaStreams:
        """Streams of at least ``longest`` cells (at most n_ctx each): ``parallel`` of them, fewer where they would
        hold more than n_ctx cells in all (the KV-cache memory estimate_memory counts); 1 for --parallel-sequences 1.
        Fewer streams change the speed, never the replies."""
        cells = min(self.n_ctx, max(_STREAM_MIN_CELLS, _round_cells(longest)))
        return self._open_streams(max(1, min(self.parallel, self.n_ctx // cells)), cells)

    def _generation_width(self, streams: LlamaStreams) -> int:
        """Streams that generate side by side: as many of ``streams`` as give each the logits of a step alone
        (checked once per stream count on this model and backend; fewer is said once, in ``notice``)."""
        n = streams.n_streams
        if n not in self._generation_widths:
            context = probe_tokens(_WIDTH_PROBE_TOKENS, self.n_vocab, seed=1)
            width = single_token_streams(streams, context[:-1], context[-1]) if n > 1 else 1
            self._generation_widths[n] = width
            if width < n:
                self.notice = (f"{width} replies generated side by side, not {n}: this backend's kernels give other "
                               f"logits for more one-token steps in one call, which would change replies")
                warnings.warn(f"{self.name}: {self.notice}", RuntimeWarning, stacklevel=2)
        return self._generation_widths[n]

    # --- speed probes ------------------------------------------------------------------------------

    def time_prompt(self, n_tokens: int, logits_rows: int = 1) -> float:
        """Seconds to decode ``n_tokens`` random tokens from an empty cache, with logits for the last
        ``logits_rows`` positions (1, as llama-bench's pp; ``n_tokens``, as scoring every token needs)."""
        self._require()
        self.reset_cache()
        tokens = probe_tokens(n_tokens, self.n_vocab, logits_rows)
        started = time.perf_counter()
        self._decode(tokens, range(n_tokens - logits_rows, n_tokens), skip_row)
        elapsed = time.perf_counter() - started
        self.reset_cache()
        return elapsed

    def time_generation(self, n_tokens: int) -> float:
        """Seconds for ``n_tokens`` single-token decodes, each feeding back the argmax (the first token not timed)."""
        self._require()
        self.reset_cache()
        nxt: list[int] = []

        def pick(_pos: int, row: np.ndarray) -> None:
            nxt.append(int(np.argmax(row)))

        self._decode([self._prefix_token], [0], pick)
        started = time.perf_counter()
        for _ in range(n_tokens):
            self._decode([nxt.pop()], [len(self._cached)], pick)
        elapsed = time.perf_counter() - started
        self.reset_cache()
        return elapsed

    # --- info --------------------------------------------------------------------------------

    @property  # type: ignore[override]
    def generation_items_per_call(self) -> int:
        """Prompts per generate_stream() call: 64 refills of every stream, so a call rarely ends on a tail of streams
        left idle (replies are checkpointed as they end, not per call)."""
        return 64 * self.parallel if self.parallel > 1 else 1

    @property  # type: ignore[override]
    def loglik_items_per_call(self) -> int:
        """Items whose requests come in one loglikelihood() call: enough for four rounds of parallel streams."""
        return 4 * self.parallel if self.parallel > 1 and self.reuse_prefix else 1

    def get_model_info(self) -> ModelInfo:
        """Model facts from the GGUF header (and from llama.cpp once loaded)."""
        meta = self.metadata
        loaded = self._model is not None
        lib = self._lib
        extra: dict[str, Any] = {
            "gguf_name": meta.get("name"),
            "vocab_size": self.n_vocab if loaded else meta.get("vocab_size"),
            "n_ctx": self.n_ctx if loaded else self.requested_n_ctx,
            "n_threads": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "n_batch": self.n_batch,
            "seed": self.seed,
            "reuse_prefix": self.reuse_prefix,
            "flash_attn": self.flash_attn,
            "batch_invariant": self.batch_invariant,
            "parallel": self.parallel,
            "generation_streams": max(self._generation_widths.values(), default=None),
        }
        if lib is not None:
            import llama_cpp

            extra["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
        return ModelInfo(
            name=self.name,
            backend=self.backend,
            path=str(self.model_path),
            architecture=meta.get("architecture"),
            parameters=int(lib.llama_model_n_params(self._model)) if loaded else meta.get("parameters"),
            quantization=meta.get("quantization"),
            context_length=meta.get("context_length"),
            file_size=meta.get("file_size"),
            add_bos_token=self.add_bos if loaded else meta.get("add_bos_token"),
            data_location="in-process",
            extra=extra,
        )

    def estimate_memory(self) -> int:
        """File size + f16 KV cache (n_layer x n_ctx x (n_embd_k_gqa + n_embd_v_gqa) x 2, twice with parallel
        streams) + compute buffers."""
        meta = self.metadata
        n_ctx = self.n_ctx or self.requested_n_ctx or min(meta.get("context_length") or 2048, _DEFAULT_MAX_CTX)
        n_layer = int(meta.get("block_count") or 0)
        n_embd = int(meta.get("embedding_length") or 0)
        heads_kv = meta.get("head_count_kv") or 0
        per_layer = heads_kv if isinstance(heads_kv, list) else [heads_kv] * n_layer
        kv_dims = (meta.get("key_length") or 0) + (meta.get("value_length") or 0)
        kv_bytes = n_ctx * sum(int(h) * kv_dims for h in per_layer) * 2
        if self.parallel > 1:  # the streams for items side by side hold up to n_ctx cells more
            kv_bytes *= 2
        n_vocab = int(meta.get("vocab_size") or 0)
        heads = meta.get("head_count") or 0
        n_head = max(heads) if isinstance(heads, list) else int(heads)
        compute = 4 * (
            2 * n_vocab * self.n_outputs_max  # logits rows: graph output + host copy
            + self.n_batch * n_embd * 16  # activations
            + self.n_batch * n_ctx * n_head  # attention scores
        )
        return int(meta["file_size"]) + kv_bytes + compute + (64 << 20)


def check_spec(spec: Any, settings: Any) -> None:
    """The GGUF for ``spec`` exists and has a valid header (no weights are loaded)."""
    from llmlab_fixtures.models.files import gguf_for_run
    from llmlab_fixtures.models.gguf import check_gguf_file

    check_gguf_file(gguf_for_run(spec.entry, spec.target, settings))


def make_provider(spec: Any, settings: Any) -> LlamaCppProvider:
    """A LlamaCppProvider for ``spec`` (a ModelSpec) with the run's BackendSettings (gpu_layers None = auto)."""
    from llmlab_fixtures.models.files import gguf_for_run
    from llmlab_fixtures.models.resources import auto_gpu_layers, free_vram, llama_gpu_offload

    path = gguf_for_run(spec.entry, spec.target, settings)
    layers = settings.gpu_layers
    if layers is None:
        offload = llama_gpu_offload()
        layers = auto_gpu_layers(gguf_metadata(path), free_vram() if offload else None, offload)
    return LlamaCppProvider(
        model_path=path,
        name=spec.label,
        n_ctx=getattr(settings, "n_ctx", None),
        n_threads=settings.threads,
        n_gpu_layers=layers,
        seed=settings.seed,
        parallel=settings.parallel_sequences,
    )
