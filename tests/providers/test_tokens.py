"""split_context: lm-evaluation-harness's context/continuation split, with contexts tokenized once per call."""

from __future__ import annotations

import re

from llmlab_fixtures.providers.tokens import split_context

PREFIX = 0


class WordTokenizer:
    """Words and the spaces before them as tokens (ids from a growing vocabulary); counts its calls."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls: list[str] = []

    def __call__(self, text: str, add_bos: bool | None = None) -> list[int]:
        self.calls.append(text)
        return [self.vocab.setdefault(piece, len(self.vocab) + 1) for piece in re.findall(r" ?\S+", text)]


def test_trailing_context_space_moves_onto_the_continuation() -> None:
    tokenize = WordTokenizer()
    ctx, cont = split_context("Answer: ", "blue sky", tokenize, PREFIX)
    assert ctx == tokenize("Answer:") and cont == tokenize(" blue sky")


def test_an_empty_context_scores_after_the_prefix_token() -> None:
    tokenize = WordTokenizer()
    assert split_context("", "blue", tokenize, PREFIX) == ([PREFIX], tokenize("blue"))


def test_choices_sharing_a_context_tokenize_it_once_with_the_same_split() -> None:
    choices = [" blue", " green", " blue and grey"]
    alone = [split_context("Q: What colour is the sky?\nA:", c, WordTokenizer(), PREFIX) for c in choices]
    tokenize, tokenized = WordTokenizer(), {}
    shared = [split_context("Q: What colour is the sky?\nA:", c, tokenize, PREFIX, tokenized) for c in choices]
    assert [(len(a), len(b)) for a, b in shared] == [(len(a), len(b)) for a, b in alone]
    assert tokenize.calls.count("Q: What colour is the sky?\nA:") == 1
    assert len(tokenize.calls) == len(choices) + 1
