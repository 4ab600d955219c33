"""Token-level rules every in-process backend shares, so their scores agree with each other and with lm-eval."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Tokenize = Callable[..., list[int]]  # tokenize(text, add_bos=None | bool) -> ids


def split_context(context: str, continuation: str, tokenize: Tokenize, prefix_token: int,
                  contexts: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness 0.4.x: trailing context whitespace moves onto the continuation; the continuation's
    tokens are those of ``context + continuation`` after the context's own tokens; an empty context scores the
    continuation after ``prefix_token`` (BOS, else EOS). ``contexts`` keeps contexts already tokenized (an item's
    choices share one)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [prefix_token], tokenize(continuation, add_bos=False)
    whole = tokenize(context + continuation)
    if contexts is None:
        contexts = {}
    ctx = contexts.get(context)
    if ctx is None:
        ctx = contexts[context] = tokenize(context)
    return ctx, whole[len(ctx):]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_stop(text: str, stops: Sequence[str], scan_from: int = 0) -> int | None:
    """Where the earliest stop string starts in ``text`` (searching from ``scan_from``), or None."""
    hits = [i for s in stops if s and (i := text.find(s, scan_from)) >= 0]
    return min(hits) if hits else None


@dataclass
class Reply:
    """How a greedy reply ends, the same on every in-process backend: at an end-of-generation token (not part of
    the reply), at the first stop string (the text cut where it starts), or after ``limit`` tokens."""

    stops: Sequence[str]
    limit: int
    text: str = ""
    n_tokens: int = 0
    reason: str | None = None  # eos, stop, length (or context, set by the backend)

    def add(self, text: str | None) -> bool:
        """Take the reply's whole text after one more token (None: the token ends generation); True once ended."""
        if text is None:
            self.reason = "eos"
            return True
        self.n_tokens += 1
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, len(self.text) - longest - 3)  # the tail may change as a character's UTF-8 bytes complete
        self.text = text
        cut = find_stop(text, self.stops, start)
        if cut is not None:
            self.text, self.reason = text[:cut], "stop"
        elif self.n_tokens >= self.limit:
            self.reason = "length"
        return self.reason is not None


def probe_tokens(n_tokens: int, vocab_size: int, logits_rows: int = 1, seed: int = 0) -> list[int]:
    """``n_tokens`` pseudo-random token ids for a prompt speed probe that reads ``logits_rows`` of them
    (llama-bench also times random tokens); ValueError unless 1 <= logits_rows <= n_tokens."""
    import random

    if not 1 <= logits_rows <= n_tokens:
        raise ValueError(f"a prompt probe of {n_tokens} tokens reads 1 to {n_tokens} logits rows, not {logits_rows}")

    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n_tokens)]
