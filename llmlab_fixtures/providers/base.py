"""The provider interface every backend implements (llama.cpp, transformers, Ollama, cloud APIs)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmlab_fixtures.errors import LlmlabError


@dataclass(frozen=True)
class Backend:
    """What llmlab knows about a backend before loading it. Each backend module declares its own in ``BACKENDS``;
    every list of backends (spec prefixes, registry sources, in-process checks, prices) is built from these."""

    name: str  # the spec prefix: ``llama-cpp:...``
    module: str  # where ``check_spec(spec, settings)`` and ``make_provider(spec, settings)`` live
    rank: int  # order in listings; among local backends, the order ``local:<alias>`` tries them in
    aliases: tuple[str, ...] = ()  # other prefixes users write (``gguf:``, ``hf:``, ``claude:``)
    in_process: bool = False  # loads weights into this process: cores, memory checks, speed figures
    loglik: bool = False  # scores multiple choice from its own log-probabilities
    loglik_check: str | None = None  # else: a function of ``module`` that says, per model, why it cannot (or None)
    hosted: bool = False  # a remote API, billed by tokens; its data leaves the machine unless its URL is loopback
    url_spec: bool = False  # the spec names a server: ``<backend>:<base_url>#<model>``
    package: str | None = None  # the Python package it cannot run without (None: always importable)
    registry_key: str | None = None  # the key of its source in a models.toml entry
    price_provider: str | None = None  # genai-prices provider id for token prices
    model_families: tuple[str, ...] = ()  # bare model names sent here by their start (``gpt-``, ``claude-``)


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` given ``context`` (lm-evaluation-harness semantics)."""

    context: str
    continuation: str


@dataclass
class LoglikelihoodResult:
    """Sum of the continuation's token log-probabilities, and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    context_tokens: int
    continuation_tokens: int
    evaluated_tokens: int  # tokens actually run through the model for this request (after cache reuse)


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy generation of at most ``max_new_tokens``, cut at the first stop string."""

    prompt: str
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    total_s: float
    evaluated_tokens: int = 0  # prompt tokens actually run through the model (after cache reuse)
    extra: dict[str, Any] = field(default_factory=dict)  # backend timing fields, usage, ...


@dataclass
class ModelInfo:
    """What a backend knows about the loaded model; written into results.json."""

    name: str
    backend: str
    path: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    file_size: int | None = None
    add_bos_token: bool | None = None
    data_location: str = "in-process"  # where prompts go: in-process, a loopback server, or a cloud host
    extra: dict[str, Any] = field(default_factory=dict)


class LoglikelihoodUnsupported(NotImplementedError):
    """The backend returns no prompt log-probabilities; score multiple choice by generation instead."""


class SpeedProbeUnsupported(NotImplementedError):
    """The backend cannot time raw prompt processing or token generation (servers and cloud APIs)."""


class Provider(ABC):
    """A loaded model behind one backend. Load once, score many items, close."""

    backend: str = "abstract"
    supports_loglikelihood: bool = False
    max_concurrency: int = 1  # items the evaluator may score at once (cloud APIs: > 1; in-process models: 1)
    loglik_items_per_call: int = 1  # items whose choices go in one loglikelihood() call (backends that batch)
    generation_items_per_call: int = 1  # prompts per generate_batch() call (backends that generate in batches)

    @abstractmethod
    def initialize(self) -> None:
        """Load the model (or connect); raise LlmlabError with a fix on failure."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Greedy generation; streams internally to time the first token."""

    def generate_stream(self, requests: Sequence[GenerationRequest]
                        ) -> Iterator[tuple[int, GenerationResult | Exception]]:
        """Greedy generation of several prompts, yielded as each reply ends: (request index, result), an item that
        failed alone with its exception in place of a result. Backends that batch generate several at once, so
        replies may end out of order; each result's ``ttft_s`` and ``total_s`` run from when its own prompt started
        (took a row or stream), so they never exceed the call. Here: one after another."""
        for index, request in enumerate(requests):
            try:
                yield index, self.generate(request)
            except Exception as exc:
                yield index, exc

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | Exception]:
        """generate_stream's results in request order."""
        results: list[GenerationResult | Exception] = [LlmlabError("no reply")] * len(requests)
        for index, result in self.generate_stream(requests):
            results[index] = result
        return results

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Log-likelihood of each continuation; requests sharing a context reuse its evaluation."""
        raise LoglikelihoodUnsupported(f"{self.backend} returns no prompt log-probabilities")

    @abstractmethod
    def get_model_info(self) -> ModelInfo:
        """Metadata of the loaded (or configured) model."""

    @abstractmethod
    def estimate_memory(self) -> int:
        """Bytes of RAM/VRAM the model needs once loaded (weights plus context cache)."""

    def time_prompt(self, n_tokens: int, logits_rows: int = 1) -> float:
        """Seconds to run ``n_tokens`` prompt tokens from an empty cache with logits for the last ``logits_rows``
        (1: llama-bench's ppN)."""
        raise SpeedProbeUnsupported(f"{self.backend} cannot time raw prompt processing (no in-process model)")

    def time_generation(self, n_tokens: int) -> float:
        """Seconds to generate ``n_tokens`` tokens one at a time after a one-token prompt (llama-bench's tgN)."""
        raise SpeedProbeUnsupported(f"{self.backend} cannot time raw token generation (no in-process model)")

    def set_threads(self, threads: int) -> bool:
        """Use ``threads`` CPU threads from the next call on; False where the backend's threads are not ours."""
        return False

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release the model's memory or connections."""

    def __enter__(self) -> Provider:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
