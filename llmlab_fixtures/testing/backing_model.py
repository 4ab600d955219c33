"""A real GGUF model behind the loopback servers: greedy completion and chat through llama-cpp-python's ``Llama``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Completion:
    """What a server needs to answer one request: the pieces of text and the counts and timings around them."""

    pieces: Iterator[str]
    prompt_tokens: int
    completion_tokens: int = 0
    done_reason: str = "stop"
    started: float = field(default_factory=time.perf_counter)
    first_piece_s: float | None = None  # seconds from start to the first piece
    total_s: float = 0.0


class BackingModel:
    """One GGUF loaded once and shared by all requests of a server (requests are served one at a time)."""

    def __init__(self, gguf_path: Path, *, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0) -> None:
        from llmlab_fixtures.testing.no_repack import load_llama

        self.path = Path(gguf_path)
        self.load_started = time.perf_counter()
        # both thread counts: llama-cpp-python otherwise processes prompts on every CPU, which on a small shared
        # machine is many times slower than the cores it was given
        self.llm = load_llama(self.path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, seed=seed,
                              verbose=False)
        self.load_s = time.perf_counter() - self.load_started
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def metadata(self) -> dict[str, Any]:
        """The GGUF key/value header as llama.cpp reports it."""
        return dict(self.llm.metadata)

    def complete(self, prompt: str, *, max_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, seed: int | None = None) -> Completion:
        """Stream a completion of the raw ``prompt``; iterate ``pieces`` under no lock of your own (this holds one)."""
        completion = Completion(pieces=iter(()), prompt_tokens=self.count_tokens(prompt))

        def pieces() -> Iterator[str]:
            with self.lock:
                self.llm.reset()
                stream = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                                    top_k=1 if temperature == 0 else 40, stop=stop or [],
                                                    stream=True, seed=seed)
                for chunk in stream:
                    choice = chunk["choices"][0]
                    if choice.get("text"):
                        completion.completion_tokens += 1
                        if completion.first_piece_s is None:
                            completion.first_piece_s = time.perf_counter() - completion.started
                        yield choice["text"]
                    if choice.get("finish_reason"):
                        completion.done_reason = "length" if choice["finish_reason"] == "length" else "stop"
                completion.total_s = time.perf_counter() - completion.started

        completion.pieces = pieces()
        return completion

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template applied to ``messages``, ending with the assistant turn's opening."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:  # a base model: plain role-prefixed turns
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        eos = self.llm.detokenize([self.llm.token_eos()]).decode("utf-8", errors="ignore")
        bos = self.llm.detokenize([self.llm.token_bos()]).decode("utf-8", errors="ignore")
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        return formatter(messages=messages).prompt
