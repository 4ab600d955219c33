"""Log-likelihoods from a Completions server's prompt log-probabilities, and the probe that catches servers that
report them wrongly.

A request sends ``context + continuation`` as the prompt with ``echo: true, logprobs: 1, max_tokens: 1`` (as
lm-evaluation-harness does); the server returns each prompt token with its text offset and log-probability. The
continuation's tokens are the ones the server's offsets place at or after the end of the context (a token that
straddles the boundary counts as the continuation's), never a local re-tokenization.

Some servers get this wrong and would score every item at chance: llama.cpp's own server returns no prompt
log-probabilities, and llama-cpp-python's server returns each prompt token's value from the logits *after* that
token (shifted by one). ``probe_defect`` sends one counting sequence, whose continuation any model predicts, and
names the defect it sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmlab_fixtures.providers.base import LoglikelihoodResult

PROBE_CONTEXT = "Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"
PROBE_CONTINUATION = " 21, 22, 23, 24, 25, 26, 27, 28, 29, 30"
PROBE_MIN_MEAN_LOGPROB = -1.5  # a counting continuation: any working model does far better per token


class NoPromptLogprobs(ValueError):
    """The response holds no log-probabilities for the prompt's tokens."""


@dataclass(frozen=True)
class PromptTokens:
    """The echoed prompt as the server tokenized it: text, character offset, log-probability and top token each."""

    tokens: list[str]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[str | None]


def request_body(model: str, prompt: str, seed: int) -> dict[str, Any]:
    """A Completions request that echoes the prompt with one log-probability (and the top token) per token."""
    return {"model": model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
            "seed": seed}


def prompt_tokens(choice: Mapping[str, Any], prompt: str) -> PromptTokens:
    """The prompt's tokens from a Completions choice (OpenAI's legacy ``logprobs``: tokens, token_logprobs,
    top_logprobs, text_offset); the generated token after the prompt is dropped. NoPromptLogprobs if absent."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("text_offset"), list):
        raise NoPromptLogprobs("it returns no prompt log-probabilities (no echoed tokens with text offsets)")
    tokens, offsets = list(logprobs.get("tokens") or []), list(logprobs["text_offset"])
    values = list(logprobs.get("token_logprobs") or [])
    tops = list(logprobs.get("top_logprobs") or [])
    if not (len(tokens) == len(offsets) == len(values)):
        raise NoPromptLogprobs("its echoed tokens, offsets and log-probabilities differ in number")
    keep = [i for i, offset in enumerate(offsets) if offset < len(prompt)]
    if not keep or all(values[i] is None for i in keep):
        raise NoPromptLogprobs("it returns no prompt log-probabilities (echo gave none for the prompt's tokens)")
    return PromptTokens([str(tokens[i]) for i in keep], [int(offsets[i]) for i in keep],
                        [None if values[i] is None else float(values[i]) for i in keep],
                        [_top_token(tops[i]) if i < len(tops) else None for i in keep])


def _top_token(top: Any) -> str | None:
    if isinstance(top, Mapping) and top:
        return str(max(top.items(), key=lambda kv: float(kv[1]))[0])
    return None


def continuation_indices(echoed: PromptTokens, context_chars: int) -> list[int]:
    """The continuation's tokens: those that end after the context does."""
    return [i for i, (token, offset) in enumerate(zip(echoed.tokens, echoed.offsets, strict=True))
            if offset + max(len(token), 1) > context_chars]


def score(echoed: PromptTokens, context_chars: int) -> LoglikelihoodResult:
    """The continuation's summed log-probability, and whether each of its tokens was the server's top choice."""
    picked = continuation_indices(echoed, context_chars)
    if not picked or picked[0] == 0:
        raise NoPromptLogprobs("the continuation starts at the first prompt token, which has no log-probability")
    values = [echoed.logprobs[i] for i in picked]
    if any(v is None for v in values):
        raise NoPromptLogprobs("a continuation token came back without a log-probability")
    greedy = all(echoed.top[i] is not None and echoed.top[i] == echoed.tokens[i] for i in picked)
    return LoglikelihoodResult(logprob=float(sum(v for v in values if v is not None)), is_greedy=greedy,
                               context_tokens=picked[0], continuation_tokens=len(picked),
                               evaluated_tokens=len(echoed.tokens))


def probe_defect(echoed: PromptTokens) -> str | None:
    """What is wrong with a server's answer to the probe (PROBE_CONTEXT + PROBE_CONTINUATION), or None.

    A server that aligns log-probabilities correctly has, at each continuation token, that token as its top
    choice more often than the token after it; a server that reports the logits after each token (shifted by one)
    has the next token on top instead."""
    picked = continuation_indices(echoed, len(PROBE_CONTEXT))
    values = [echoed.logprobs[i] for i in picked]
    if not picked or any(v is None for v in values):
        return "it returns no prompt log-probabilities for the continuation"
    same = sum(echoed.top[i] == echoed.tokens[i] for i in picked)
    following = sum(echoed.top[i] == echoed.tokens[i + 1] for i in picked if i + 1 < len(echoed.tokens))
    mean = sum(v for v in values if v is not None) / len(values)
    if following > same:
        return (f"its prompt log-probabilities are shifted by one token (each token's value comes from the logits "
                f"after it: the top token matched the next token {following} times, the token itself {same} times); "
                "llama-cpp-python's server does this")
    if mean < PROBE_MIN_MEAN_LOGPROB:
        return (f"its prompt log-probabilities do not predict a counting sequence (mean {mean:.2f} per token); "
                "scores would be at chance")
    return None


def probe_prompt() -> str:
    return PROBE_CONTEXT + PROBE_CONTINUATION


def first_choice(response: Any) -> Mapping[str, Any]:
    """The first choice of a Completions response (an SDK object or a dict) as a dict."""
    data = response.model_dump() if hasattr(response, "model_dump") else response
    choices: Sequence[Any] = (data or {}).get("choices") or []
    if not choices or not isinstance(choices[0], Mapping):
        raise NoPromptLogprobs("it returned no choices")
    return choices[0]
