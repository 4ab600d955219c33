"""A loopback stand-in for vLLM's OpenAI-compatible server (``/v1/completions``, ``/v1/models``), backed by a real
GGUF through llama.cpp, with prompt log-probabilities aligned as vLLM aligns them: each prompt token's value is
log P(token | the tokens before it), the first token has none.

    python -m llmlab_fixtures.testing.vllm_server --model PATH --served-model-name NAME --port P

Completions semantics it serves: ``prompt`` (text), ``max_tokens``, greedy decoding, ``stop``, ``echo`` (the prompt
before the completion, in ``text`` and in ``logprobs``), ``logprobs: N`` (OpenAI's legacy ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``), vLLM's ``prompt_logprobs: N`` and ``stream`` (SSE, with
``stream_options.include_usage``). ``--no-prompt-logprobs`` answers as llama.cpp's own server does (llama.cpp issue
27174): ``echo`` is ignored and only generated tokens get log-probabilities, so clients can test their refusal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmlab_fixtures.testing.loopback import LoopbackHandler, LoopbackHTTPServer, new_id
from llmlab_fixtures.testing.no_repack import load_llama


@dataclass
class Scored:
    """A prompt and its greedy continuation: token ids, their text pieces and log-probabilities."""

    ids: list[int]
    pieces: list[str]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]  # per token: the N most likely tokens at its position
    n_prompt: int
    finish_reason: str = "length"


class PromptScorer:
    """A GGUF model that scores every prompt token and decodes greedily, one request at a time."""

    def __init__(self, model_path: Path | str, *, n_ctx: int = 1024, threads: int = 1) -> None:
        self.llm = load_llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True,
                              verbose=False, seed=0)
        self.add_bos = str(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"
        self.end_tokens = _end_tokens(self.llm)
        self.lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True))

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's text, decoded incrementally so that multi-byte characters land whole on one token."""
        out, data, before = [], b"", ""
        for token in ids:
            data += self.llm.detokenize([token])
            text = data.decode("utf-8", errors="ignore")
            out.append(text[len(before):])
            before = text
        return out

    def run(self, prompt: str, max_tokens: int, stops: list[str], top_n: int) -> Scored:
        """Score ``prompt`` and continue it greedily for up to ``max_tokens`` tokens (cut at a stop string)."""
        ids = self.tokenize(prompt)
        if len(ids) + max_tokens > self.llm.n_ctx():
            raise ValueError(f"This model's maximum context length is {self.llm.n_ctx()} tokens; the prompt has "
                             f"{len(ids)} and max_tokens is {max_tokens}")
        with self.lock:
            self.llm.reset()
            self.llm.eval(ids)
            rows = _log_softmax(np.asarray(self.llm.scores[: len(ids)], dtype=np.float64))
            logprobs: list[float | None] = [None]
            top: list[list[tuple[int, float]]] = [[]]
            for i in range(1, len(ids)):
                logprobs.append(float(rows[i - 1][ids[i]]))
                top.append(_top(rows[i - 1], top_n))
            scored = Scored(ids, [], logprobs, top, len(ids))
            last = rows[-1]
            generated = b""
            for _ in range(max_tokens):
                token = int(np.argmax(last))
                if token in self.end_tokens:
                    scored.finish_reason = "stop"
                    break
                scored.ids.append(token)
                scored.logprobs.append(float(last[token]))
                scored.top.append(_top(last, top_n))
                generated += self.llm.detokenize([token])
                if any(stop in generated.decode("utf-8", errors="ignore") for stop in stops):
                    scored.finish_reason = "stop"
                    break
                self.llm.eval([token])
                last = _log_softmax(np.asarray(self.llm.scores[self.llm.n_tokens - 1 : self.llm.n_tokens],
                                               dtype=np.float64))[0]
        scored.pieces = self.pieces(scored.ids)
        return scored


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top(row: np.ndarray, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    best = np.argpartition(-row, n - 1)[:n]
    return sorted(((int(i), float(row[i])) for i in best), key=lambda pair: -pair[1])


def _end_tokens(llm: Any) -> set[int]:
    """End-of-generation tokens (EOS, end of turn), as llama.cpp treats them."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {llm.token_eos(), *(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))}


def _cut(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


@dataclass
class VllmState:
    """What the handler serves: one model under one name, the defect to mimic, and counters for tests."""

    url: str
    scorer: PromptScorer
    served_name: str
    prompt_logprobs: bool = True
    prompts: list[str] = field(default_factory=list)  # every completion prompt served, in order
    stop_after: int | None = None  # tests: the server dies (cutting open connections) after this many prompts
    shutdown: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class VllmHandler(LoopbackHandler):
    """vLLM's OpenAI-compatible Completions routes."""

    server_version = "uvicorn"

    @property
    def vllm(self) -> VllmState:
        return self.server.state  # type: ignore[no-any-return]

    def error(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        self.send_json(status, {"object": "error", "message": message, "type": kind, "param": None, "code": status})

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/v1/models":
            return self.error(404, "Not Found", "NotFoundError")
        self.send_json(200, {"object": "list", "data": [{"id": self.vllm.served_name, "object": "model",
                                                         "created": int(time.time()), "owned_by": "vllm",
                                                         "max_model_len": self.vllm.scorer.llm.n_ctx()}]})

    def do_POST(self) -> None:
        try:
            payload = json.loads(self.read_body() or b"null")
        except ValueError:
            return self.error(400, "request body is not valid JSON")
        if self.path.split("?")[0] != "/v1/completions":
            return self.error(404, "Not Found", "NotFoundError")
        if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
            return self.error(400, "prompt must be a string")
        if payload.get("model") != self.vllm.served_name:
            return self.error(404, f"The model `{payload.get('model')}` does not exist.", "NotFoundError")
        stops = payload.get("stop") or []
        stops = [stops] if isinstance(stops, str) else [str(s) for s in stops]
        logprobs = payload.get("logprobs")
        prompt_logprobs = payload.get("prompt_logprobs")
        top_n = max(int(logprobs or 0), int(prompt_logprobs or 0))
        try:
            scored = self.vllm.scorer.run(payload["prompt"], int(payload.get("max_tokens", 16)), stops, top_n)
        except ValueError as exc:
            return self.error(400, str(exc))
        with self.vllm.lock:
            self.vllm.prompts.append(payload["prompt"])
            dies = self.vllm.stop_after is not None and len(self.vllm.prompts) >= self.vllm.stop_after
        if dies:  # as a crashed server: no answer, open connections cut, nothing listening any more
            threading.Thread(target=self.vllm.shutdown, daemon=True).start()
            return self.hang_up()
        if payload.get("stream"):
            return self._stream(payload, scored, stops)
        self.send_json(200, self._completion(payload, scored, stops, logprobs, prompt_logprobs))

    def _completion(self, payload: dict[str, Any], scored: Scored, stops: list[str], logprobs: Any,
                    prompt_logprobs: Any) -> dict[str, Any]:
        prompt = payload["prompt"]
        generated = _cut("".join(scored.pieces[scored.n_prompt:]), stops)
        echo = bool(payload.get("echo")) and self.vllm.prompt_logprobs
        choice: dict[str, Any] = {"index": 0, "text": (prompt if echo else "") + generated, "logprobs": None,
                                  "finish_reason": scored.finish_reason, "stop_reason": None}
        if logprobs is not None:
            first = 0 if echo else scored.n_prompt
            choice["logprobs"] = (self._legacy_logprobs(scored, first, prompt if echo else "")
                                  if self.vllm.prompt_logprobs else self._llama_server_logprobs(scored))
        if prompt_logprobs is not None and self.vllm.prompt_logprobs:
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": lp, "rank": rank + 1, "decoded_token": self._piece(t)}
                 for rank, (t, lp) in enumerate(self._with_token(scored, i))} for i in range(1, scored.n_prompt)]
        n_out = len(scored.ids) - scored.n_prompt
        return {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
                "model": payload["model"], "choices": [choice],
                "usage": {"prompt_tokens": scored.n_prompt, "completion_tokens": n_out,
                          "total_tokens": scored.n_prompt + n_out}}

    def _piece(self, token: int) -> str:
        return self.vllm.scorer.pieces([token])[0]

    @staticmethod
    def _with_token(scored: Scored, i: int) -> list[tuple[int, float]]:
        """The top tokens at position ``i`` plus the token itself (vLLM always includes the actual token)."""
        top = list(scored.top[i])
        if scored.ids[i] not in {t for t, _ in top}:
            top.append((scored.ids[i], float(scored.logprobs[i] or 0.0)))
        return top

    def _legacy_logprobs(self, scored: Scored, first: int, echoed: str) -> dict[str, Any]:
        tokens, offsets, values, tops = [], [], [], []
        offset = 0 if first == 0 else len(echoed)
        for i in range(first, len(scored.ids)):
            tokens.append(scored.pieces[i])
            offsets.append(offset)
            offset += len(scored.pieces[i])
            values.append(scored.logprobs[i])
            tops.append(None if i == 0 else {self._piece(t): lp for t, lp in self._with_token(scored, i)})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _llama_server_logprobs(self, scored: Scored) -> dict[str, Any]:
        """llama.cpp server's shape: generated tokens only, no text offsets."""
        return {"content": [{"token": scored.pieces[i], "logprob": scored.logprobs[i],
                             "top_logprobs": [{"token": self._piece(t), "logprob": lp} for t, lp in scored.top[i]]}
                            for i in range(scored.n_prompt, len(scored.ids))]}

    def _stream(self, payload: dict[str, Any], scored: Scored, stops: list[str]) -> None:
        completion_id, created = new_id("cmpl-"), int(time.time())
        text = _cut("".join(scored.pieces[scored.n_prompt:]), stops)
        self.start_stream()
        chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": payload["model"]}
        if text:
            self.write_event({**chunk, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": None}]})
        self.write_event({**chunk, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": scored.finish_reason}]})
        if (payload.get("stream_options") or {}).get("include_usage"):
            n_out = len(scored.ids) - scored.n_prompt
            self.write_event({**chunk, "choices": [], "usage": {"prompt_tokens": scored.n_prompt,
                                                                "completion_tokens": n_out,
                                                                "total_tokens": scored.n_prompt + n_out}})
        self.write_event("[DONE]")
        self.end_stream()


@contextlib.contextmanager
def running_vllm_server(model_path: Path | str, served_name: str, *, prompt_logprobs: bool = True,
                        n_ctx: int = 1024, threads: int = 1, port: int = 0) -> Iterator[VllmState]:
    """Serve ``model_path`` as ``served_name`` on 127.0.0.1 in a thread; yields the state (``.url`` ends in /v1)."""
    scorer = PromptScorer(model_path, n_ctx=n_ctx, threads=threads)
    server = LoopbackHTTPServer(("127.0.0.1", port), VllmHandler)
    server.state = VllmState(f"{server.url}/v1", scorer, served_name, prompt_logprobs,
                             shutdown=lambda: server.stop(cut_connections=True))
    server.start(name="loopback-vllm")
    try:
        yield server.state
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m llmlab_fixtures.testing.vllm_server``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m llmlab_fixtures.testing.vllm_server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the GGUF file to serve")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: the file)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int, default=1024, help="context length in tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-prompt-logprobs", action="store_true",
                        help="answer as llama.cpp's server does: no prompt log-probabilities")
    args = parser.parse_args(argv)
    name = args.served_model_name or Path(args.model).name
    with running_vllm_server(args.model, name, prompt_logprobs=not args.no_prompt_logprobs, n_ctx=args.max_model_len,
                             threads=args.threads, port=args.port) as state:
        print(f"serving {name} at {state.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
