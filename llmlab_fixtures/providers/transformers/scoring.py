"""Log-likelihood scoring for the transformers provider: requests become rows of tokens, identical rows are run
once, and rows either run whole in right-padded batches or, with prefix sharing, after a KV cache of their shared
prefix as packed token trees (token_tree, tree_attention); batch sizes back off on out-of-memory errors."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.models.torch_device import is_out_of_memory
from llmlab_fixtures.providers.base import LoglikelihoodRequest, LoglikelihoodResult
from llmlab_fixtures.providers.tokens import common_prefix_length
from llmlab_fixtures.providers.transformers.token_tree import PackedTree, pack_tree
from llmlab_fixtures.providers.transformers.tree_attention import (
    TREE_BLOCKS_KWARG,
    install_tree_attention,
    plan_blocks,
    tree_mask,
)

AUTO_MAX_BATCH = 64  # rows per forward pass where auto batching starts (halved on out-of-memory)
_TOKEN_BUDGET = {"cpu": 1024, "mps": 65_536, "cuda": 262_144}  # auto: rows x padded length per pass (CPU peaks near 1k)
_NORMALISER_ROWS = 32  # logits rows per logsumexp call (a 6 MB temporary for a 49k vocabulary)
_LOGITS_BUDGET = 1 << 30  # auto: bytes of fp32 logits per forward pass (rows' continuation tokens x vocab)
# tokens per packed forward pass (a token tree of many rows; halved on out-of-memory): on a CPU each pass costs about
# 60 ms besides its tokens, and with block attention a node's attention does not grow with the tree, so large trees
# pay off; masked (eager) attention grows with the square of the count and takes at most _PACK_TOKENS_DENSE
_PACK_TOKENS = {"cpu": 1536, "mps": 4096, "cuda": 4096}
_PACK_TOKENS_DENSE = 512


@dataclass
class _Row:
    """One log-likelihood request ready for the model: input tokens and the continuation tokens they predict."""

    index: int  # position in the caller's request list
    tokens: list[int]  # (context + continuation)[-(max_length + 1):][:-1]
    targets: list[int]  # the continuation tokens the last len(targets) positions predict
    context_tokens: int
    continuation_tokens: int
    readers: list[_Row] = field(default_factory=list)  # other requests with the same tokens: they read this row

    @property
    def n_keep(self) -> int:
        """Positions at the end of the row whose logits are read (the longest continuation among its readers)."""
        return max(len(r.targets) for r in (self, *self.readers))

    @property
    def first_target(self) -> int:
        """The first position whose logits are needed: a shared prefix must stop before it."""
        return len(self.tokens) - self.n_keep


def _merge_identical(rows: list[_Row]) -> list[_Row]:
    """One row per distinct input (MMLU's four one-token answers run the same context): the others read it."""
    first: dict[tuple[int, ...], _Row] = {}
    merged: list[_Row] = []
    for row in rows:
        owner = first.setdefault(tuple(row.tokens), row)
        if owner is row:
            merged.append(row)
        else:
            owner.readers.append(row)
    return merged


@dataclass
class _Prefix:
    """A batch-1 KV cache holding ``tokens``; ``new_tokens`` of them were run by the call that built it."""

    tokens: list[int]
    cache: Any
    new_tokens: int


def _cut_cache(cache: Any, length: int) -> None:
    """Drop every position of ``cache`` after the first ``length`` (transformers crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _has_sliding_window(config: Any) -> bool:
    """Whether some attention layers only see a window of recent tokens (Gemma 2/3, Mistral...)."""
    text = getattr(config, "get_text_config", lambda: config)()
    layer_types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None)) and (not layer_types or "sliding_attention" in layer_types)


def _shared_prefix_length(rows: Sequence[_Row]) -> int:
    """Tokens every row starts with, stopping before any row's first predicted position (its logits are needed)."""
    first = rows[0].tokens
    shared = min(r.first_target for r in rows)
    for row in rows[1:]:
        shared = min(shared, common_prefix_length(first, row.tokens))
    return shared


def _score_continuations(logits: Any, spans: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                         ) -> list[tuple[float, bool]]:
    """(sum of log-probs, whether every token is the argmax) per continuation: continuation i's tokens
    ``targets[i]`` are predicted by rows ``spans[i]`` of ``logits`` [rows, vocab].

    Vectorised over every continuation; the softmax normaliser is torch's fp32 logsumexp (within 1e-6 nat of an
    fp64 sum, as lm-eval's fp32 log_softmax is), taken ``_NORMALISER_ROWS`` rows at a time so its vocabulary-wide
    temporary is small and reused instead of a fresh allocation the size of ``logits`` (page faults cost more than
    the arithmetic). ``max`` gives argmax's index (the first of tied maxima) at a third of its cost on CPU.
    """
    import torch

    device = logits.device
    where = torch.tensor([row for span in spans for row in span], dtype=torch.long, device=device)
    wanted = torch.tensor([token for tokens in targets for token in tokens], dtype=torch.long, device=device)
    owner = torch.repeat_interleave(torch.arange(len(spans), device=device),
                                    torch.tensor([len(span) for span in spans], device=device))
    logits = logits.float()  # a copy only when the model returned half precision
    chosen = logits[where, wanted].double()
    best = logits.max(dim=-1).indices
    normalizer = torch.cat([torch.logsumexp(part, dim=-1) for part in logits.split(_NORMALISER_ROWS)]).double()
    logprobs = torch.zeros(len(spans), dtype=torch.float64, device=device).index_add_(
        0, owner, chosen - normalizer[where])
    misses = torch.zeros(len(spans), dtype=torch.long, device=device).index_add_(
        0, owner, (best[where] != wanted).long())
    return list(zip(logprobs.tolist(), (misses == 0).tolist()))


class LoglikelihoodScoring:
    """TransformersProvider's log-likelihood scoring (``loglikelihood``).

    It relies on the provider's loaded ``_model`` and ``_tokenizer``, its ``name``, ``device``, ``dtype``,
    ``max_length``, ``pad_id``, ``batch_size`` (None = auto), ``share_prefix``, ``tree_blocks``, ``_attention``,
    ``_cache_kwarg`` and ``_mask_logits``, and on its ``_require()`` and ``encode_pair()``; it keeps the shared
    prefix's KV cache in ``_prefix`` and the auto sizes ``_auto_batch`` and ``_pack_tokens`` (halved on
    out-of-memory), which the provider initialises.
    """

    _model: Any
    _tokenizer: Any
    name: str
    device: str | None
    dtype: Any
    max_length: int
    pad_id: int
    batch_size: int | None
    share_prefix: bool
    tree_blocks: bool
    _attention: str
    _cache_kwarg: str
    _mask_logits: bool
    _prefix: _Prefix | None
    _auto_batch: int
    _pack_tokens: int

    def _setup_scoring(self) -> None:
        """Fit the packed trees to the loaded model: SDPA gets block attention, other kernels smaller trees."""
        if self._attention == "sdpa":
            install_tree_attention()
        self._pack_tokens = _PACK_TOKENS.get(self.device.split(":")[0], _PACK_TOKENS["cpu"])
        if self._attention != "sdpa":
            self._pack_tokens = min(self._pack_tokens, _PACK_TOKENS_DENSE)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Sum of continuation log-probs per request; results come back in the order given.

        With prefix sharing (the default), the token prefix every request shares (a few-shot block, a fixed
        primer) is run once into a KV cache that the next call reuses as far as it matches, and the rest is
        packed as a token tree (each distinct prefix once: an item's context for all its choices, identical
        inputs once). Without it, each request runs whole in right-padded batches, longest first.
        """
        self._require()
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        rows: list[_Row] = []
        tokenized: dict[str, list[int]] = {}  # each context once, however many choices share it
        for index, req in enumerate(requests):
            ctx, cont = self.encode_pair(req.context, req.continuation, tokenized)
            seq = (ctx + cont)[-(self.max_length + 1) :]  # left-truncate like lm-eval
            tokens = seq[:-1]
            n_cont = min(len(cont), len(tokens))
            if n_cont == 0:
                results[index] = LoglikelihoodResult(0.0, True, len(ctx), len(cont), 0)
                continue
            rows.append(_Row(index, tokens, seq[len(seq) - n_cont :], len(ctx), len(cont)))
        packed = rows and self.share_prefix
        for index, result in self._score_packed(_merge_identical(rows)) if packed else self._score_padded(rows):
            results[index] = result
        return [r for r in results if r is not None]

    def _score_padded(self, rows: list[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """Every row whole, in right-padded batches longest first (an out-of-memory error shows on the first)."""
        rows = sorted(rows, key=lambda r: (-len(r.tokens), r.tokens))
        scored: list[tuple[int, LoglikelihoodResult]] = []
        start = 0
        while start < len(rows):
            size = self._batch_rows(rows, start)
            batch = rows[start : start + size]
            try:
                scored += self._score_batch(batch)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                if self.batch_size is not None:
                    raise LlmlabError(f"{self.name} ran out of memory on {self.device} scoring {size} rows of "
                                      f"{len(batch[0].tokens)} tokens; lower --batch-size or use --batch-size auto"
                                      ) from exc
                if size == 1:
                    raise self._one_row_too_big(len(batch[0].tokens)) from exc
                self._auto_batch = max(1, size // 2)
                continue
            start += size
        return scored

    def _one_row_too_big(self, n_tokens: int) -> LlmlabError:
        return LlmlabError(f"{self.name} ran out of memory on {self.device} scoring one row of {n_tokens} tokens; "
                           "use fewer few-shot examples, a smaller model or another --device")

    def _score_packed(self, rows: list[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """The shared prefix from the KV cache, then the rest packed as token trees of up to ``_pack_tokens``
        nodes (at most --batch-size rows each when set), one forward pass per tree."""
        shared = _shared_prefix_length(rows)
        prefix = self._prefix_state(rows[0].tokens[:shared]) if shared else None
        rows = sorted(rows, key=lambda r: r.tokens[shared:])  # rows that share a prefix side by side
        suffixes = [r.tokens[shared:] for r in rows]
        keep = [r.n_keep for r in rows]
        scored: list[tuple[int, LoglikelihoodResult]] = []
        first = 0
        while first < len(rows):
            tree = pack_tree(suffixes, keep, first, max_nodes=self._pack_tokens,
                             max_kept=max(1, _LOGITS_BUDGET // self._logits_row_bytes()), max_sequences=self.batch_size)
            try:
                scored += self._score_tree(rows[first : first + tree.count], tree, prefix, shared)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                if tree.count == 1:
                    raise self._one_row_too_big(shared + len(tree.tokens)) from exc
                if self.batch_size is not None:
                    raise LlmlabError(f"{self.name} ran out of memory on {self.device} scoring {tree.count} rows "
                                      "in one pass; lower --batch-size or use --batch-size auto") from exc
                self._pack_tokens = max(1, len(tree.tokens) // 2)
                continue
            first += tree.count
        if prefix is not None and prefix.new_tokens:  # the shared prefix's cost goes to the first request
            scored[0][1].evaluated_tokens += prefix.new_tokens
        return scored

    def _score_tree(self, rows: Sequence[_Row], tree: PackedTree, prefix: _Prefix | None,
                    shared: int) -> list[tuple[int, LoglikelihoodResult]]:
        """One forward pass over a packed token tree after ``shared`` cached tokens: each node attends to the
        cached prefix, its ancestors and itself, at position ``shared`` + its depth."""
        import torch

        n = len(tree.tokens)
        allowed = tree_mask(tree, shared)
        blocks = plan_blocks(tree, allowed, shared, prefix_apart=self.device.startswith("cpu")) \
            if self.tree_blocks and self._attention == "sdpa" else None
        if self._attention != "sdpa":  # eager attention adds the mask to its scores
            allowed = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        keep = torch.zeros((1, n), dtype=torch.bool)
        keep[0, tree.kept] = True
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([tree.tokens], dtype=torch.long, device=self.device),
            "position_ids": torch.tensor([tree.depths], dtype=torch.long, device=self.device) + shared,
            "attention_mask": allowed[None, None].to(self.device),
            "use_cache": prefix is not None,
        }
        if prefix is not None:
            kwargs[self._cache_kwarg] = prefix.cache
        if self._mask_logits:
            kwargs["logits_to_keep"] = keep.to(self.device)
        if blocks is not None:
            kwargs[TREE_BLOCKS_KWARG] = blocks.to(self.device)
        try:
            with torch.inference_mode():
                logits = self._model(**kwargs).logits
        finally:
            if prefix is not None:
                _cut_cache(prefix.cache, shared)  # the tree's tokens leave the cache; the shared prefix stays
        position = {node: i for i, node in enumerate(tree.kept)}
        # (request, its tree path, tokens it evaluated): identical requests read their owner's row, evaluating none
        readers = [(reader, path, new if reader is row else 0) for row, path, new in
                   zip(rows, tree.paths, tree.new_nodes) for reader in (row, *row.readers)]
        with torch.inference_mode():
            picked = logits if self._mask_logits else logits[0][keep[0].to(logits.device)]  # [kept nodes, vocab]
            del logits
            scores = _score_continuations(
                picked, [[position[node] for node in path[len(path) - len(reader.targets):]]
                         for reader, path, _ in readers], [reader.targets for reader, _, _ in readers])
        return [(reader.index, LoglikelihoodResult(
            logprob=logprob, is_greedy=greedy, context_tokens=reader.context_tokens,
            continuation_tokens=reader.continuation_tokens, evaluated_tokens=new,
        )) for (reader, _, new), (logprob, greedy) in zip(readers, scores)]

    def _prefix_state(self, tokens: list[int]) -> _Prefix:
        """A batch-1 KV cache holding exactly ``tokens``: the previous call's cache cut back to the common prefix,
        then extended."""
        import torch
        from transformers import DynamicCache

        held = self._prefix
        keep = common_prefix_length(held.tokens, tokens) if held is not None else 0
        if held is None or keep == 0:
            cache = DynamicCache(config=self._model.config)
        else:
            cache = held.cache
            _cut_cache(cache, keep)
        if keep < len(tokens):
            ids = torch.tensor([tokens[keep:]], dtype=torch.long, device=self.device)
            positions = torch.arange(keep, len(tokens), device=self.device)[None, :]
            mask = torch.ones((1, len(tokens)), dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kwarg: cache})
        self._prefix = _Prefix(list(tokens), cache, len(tokens) - keep)
        return self._prefix

    def _batch_rows(self, rows: Sequence[_Row], start: int) -> int:
        """Rows in the next padded forward pass: --batch-size, or auto (the remembered size, within memory budgets
        for the padded tokens and the logits read)."""
        if self.batch_size is not None:
            return min(self.batch_size, len(rows) - start)
        device = (self.device or "cpu").split(":")[0]
        budget = _TOKEN_BUDGET.get(device, _TOKEN_BUDGET["cpu"])
        max_rows = min(self._auto_batch, max(1, budget // len(rows[start].tokens)))
        vocab_bytes = self._logits_row_bytes()
        size, n_logits = 0, 0
        while start + size < len(rows) and size < max_rows:
            n_logits += rows[start + size].n_keep
            if size and n_logits * vocab_bytes > _LOGITS_BUDGET:
                break
            size += 1
        return max(1, size)

    def _logits_row_bytes(self) -> int:
        """Bytes of one position's fp32 logits (the whole vocabulary)."""
        return 4 * int(getattr(self._model.config, "vocab_size", 0) or len(self._tokenizer))

    def _score_batch(self, batch: Sequence[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """One right-padded forward pass over ``batch`` (rows sorted longest first); (request index, result) for
        every row."""
        import torch

        width = len(batch[0].tokens)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, row in enumerate(batch):
            n = len(row.tokens)
            ids[b, :n] = torch.tensor(row.tokens, dtype=torch.long)
            mask[b, :n] = 1
            keep[b, n - row.n_keep : n] = True  # positions whose logits predict the continuation
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                                  "use_cache": False}
        if self._mask_logits:
            kwargs["logits_to_keep"] = keep.to(self.device)
        spans, offset = [], 0
        for row in batch:
            spans.append(range(offset, offset + row.n_keep))
            offset += row.n_keep
        with torch.inference_mode():
            logits = self._model(**kwargs).logits
            picked = logits if self._mask_logits else logits[keep.to(logits.device)]  # [total targets, vocab]
            del logits
            scores = _score_continuations(picked, spans, [row.targets for row in batch])
        return [(row.index, LoglikelihoodResult(
            logprob=logprob, is_greedy=greedy, context_tokens=row.context_tokens,
            continuation_tokens=row.continuation_tokens, evaluated_tokens=len(row.tokens),
        )) for row, (logprob, greedy) in zip(batch, scores)]

    def _release_memory(self) -> None:
        gc.collect()
        if self.device and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        elif self.device == "mps":
            import torch

            torch.mps.empty_cache()
