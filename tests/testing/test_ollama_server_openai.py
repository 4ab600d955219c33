"""Ollama's OpenAI-compatible API (``/v1``) on the loopback Ollama server, driven by the official ``openai`` SDK and by
llmlab's ``openai-compat`` backend.

With ``OLLAMA_HOST`` set these tests run against that real Ollama (model tag from ``LLMLAB_TEST_OLLAMA_MODEL``,
default ``smollm2:135m``); otherwise they start the loopback server on the embedded SmolLM2. Every token count is
checked against the same server's native ``/api`` answer for the same request; fault injection and the tokenizer
check need the loopback server and skip on a real one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf  # noqa: E402
from llmlab_fixtures.models.specs import ModelSpec  # noqa: E402
from llmlab_fixtures.providers import BackendSettings, GenerationRequest, check_available, create_provider  # noqa: E402
from llmlab_fixtures.providers.ollama import resolve_host  # noqa: E402
from llmlab_fixtures.testing.ollama_server import OllamaServer  # noqa: E402

REAL_HOST = os.environ.get("OLLAMA_HOST") or None
TAG = os.environ.get("LLMLAB_TEST_OLLAMA_MODEL", "smollm2:135m") if REAL_HOST else "smollm2:135m"
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
TIMEOUT = 300.0  # a loaded 2-core machine can take seconds per token
GREEDY = {"temperature": 0, "seed": 7}


@dataclass
class Target:
    """The server under test: its base URL (no /v1), and the loopback server object (None for a real Ollama)."""

    url: str
    server: OllamaServer | None

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if REAL_HOST:
        yield Target(resolve_host(REAL_HOST), None)
        return
    with OllamaServer({TAG: embedded_gguf(SMOLLM2)}, num_thread=1) as server:
        yield Target(server.url, server)


@pytest.fixture
def loopback(target: Target) -> OllamaServer:
    if target.server is None:
        pytest.skip("needs the loopback server (fault injection / its tokenizer); OLLAMA_HOST is set")
    return target.server


@pytest.fixture(scope="module")
def client(target: Target) -> Iterator[Any]:
    with openai.OpenAI(base_url=target.v1, api_key="ollama", timeout=TIMEOUT, max_retries=0) as c:
        yield c


def native(target: Target, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request through Ollama's own API (/api/generate or /api/chat), not streamed."""
    response = httpx.post(f"{target.url}{path}", json={**body, "stream": False}, timeout=TIMEOUT)
    response.raise_for_status()
    return response.json()


def native_generate(target: Target, prompt: str, max_tokens: int, **options: Any) -> dict[str, Any]:
    return native(target, "/api/generate", {"model": TAG, "prompt": prompt,
                                            "options": {"num_predict": max_tokens, **GREEDY, **options}})


def sse_events(target: Target, path: str, body: dict[str, Any]) -> list[str]:
    """The raw ``data:`` payloads of a streamed /v1 answer, in order."""
    with httpx.stream("POST", f"{target.v1}{path}", json={**body, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), text
    return [block[len("data: "):] for block in events]


# --- the openai SDK against /v1 ---------------------------------------------------------------------------------


def test_models_list_the_served_tag(client: Any) -> None:
    models = client.models.list().data
    ours = next(m for m in models if m.id == TAG)
    assert ours.object == "model" and ours.owned_by == "library" and ours.created > 0


def test_completion_non_streaming_has_the_real_usage(client: Any, target: Target) -> None:
    reply = client.completions.create(model=TAG, prompt=PROMPT, max_tokens=8, **GREEDY)
    same = native_generate(target, PROMPT, 8)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == TAG
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert reply.choices[0].text == same["response"] and reply.choices[0].text.strip()
    assert reply.choices[0].finish_reason == same["done_reason"] == "length"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (same["prompt_eval_count"], same["eval_count"])
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_streaming_with_usage(client: Any, target: Target) -> None:
    chunks = list(client.completions.create(model=TAG, prompt=PROMPT, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    whole = client.completions.create(model=TAG, prompt=PROMPT, max_tokens=8, **GREEDY)
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                                        whole.usage.completion_tokens)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert all(c.object == "text_completion" and c.id == last.id for c in chunks)
    # like Ollama, the chunks before the last carry an all-zero usage while usage is asked for
    assert all(c.usage is not None and c.usage.total_tokens == 0 for c in content)


def test_streams_end_with_done_and_send_usage_only_when_asked(target: Target) -> None:
    body = {"model": TAG, "prompt": PROMPT, "max_tokens": 4, **GREEDY}
    plain = sse_events(target, "/completions", body)
    assert plain[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) and json.loads(e)["choices"] for e in plain[:-1])
    asked = sse_events(target, "/completions", {**body, "stream_options": {"include_usage": True}})
    assert asked[-1] == "[DONE]" and len(asked) == len(plain) + 1
    final = json.loads(asked[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4 and final["usage"]["prompt_tokens"] > 0


def test_stop_strings_string_and_list(client: Any, target: Target) -> None:
    greedy = native_generate(target, PROMPT, 12)["response"]
    word = greedy.split()[1]  # a word from the middle of the greedy text
    expected = greedy[: greedy.index(word)]
    for stop in (word, ["@@", word]):
        reply = client.completions.create(model=TAG, prompt=PROMPT, max_tokens=12, stop=stop, **GREEDY)
        assert reply.choices[0].text == expected
        assert reply.choices[0].finish_reason == "stop"
        assert 0 < reply.usage.completion_tokens < 12


def test_chat_completions_streaming_and_not(client: Any, target: Target) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    same = native(target, "/api/chat", {"model": TAG, "messages": messages,
                                        "options": {"num_predict": 10, **GREEDY}})
    reply = client.chat.completions.create(model=TAG, messages=messages, max_tokens=10, **GREEDY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == same["message"]["content"] and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == same["done_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (same["prompt_eval_count"],
                                                                          same["eval_count"])
    chunks = list(client.chat.completions.create(model=TAG, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    *content, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.choices[0].delta.role == "assistant" for c in content)
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content for c in content) == reply.choices[0].message.content
    assert last.choices == [] and last.usage.prompt_tokens == reply.usage.prompt_tokens
    assert last.usage.completion_tokens == reply.usage.completion_tokens


def test_unknown_model_is_a_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="llmlab-no-such-model:0b", prompt=PROMPT, max_tokens=2)
    assert caught.value.status_code == 404
    error = caught.value.body
    assert error["message"] == 'model "llmlab-no-such-model:0b" not found, try pulling it first'
    assert error["type"] == "api_error"  # Ollama passes /api's errors on as API errors, status kept
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llmlab-no-such-model:0b", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/completions", b"{", None),
    ("/completions", b"[]", "json: cannot unmarshal array into Go value of type openai.CompletionRequest"),
    ("/completions", {"model": TAG, "prompt": PROMPT, "max_tokens": "8"},
     "json: cannot unmarshal string into Go struct field CompletionRequest.max_tokens of type int"),
    ("/completions", {"model": TAG, "prompt": PROMPT, "stop": ["\n", 3]}, "invalid type for 'stop' field: float64"),
    ("/completions", {"model": TAG, "prompt": PROMPT, "stream_options": {"include_usage": "yes"}},
     "json: cannot unmarshal string into Go struct field StreamOptions.stream_options.include_usage of type bool"),
    ("/chat/completions", {"model": TAG, "messages": []}, "[] is too short - 'messages'"),
    ("/chat/completions", {"model": TAG, "messages": [{"role": "user", "content": 5}]},
     "invalid message content type: float64"),
])
def test_bad_bodies_are_400s(target: Target, path: str, body: Any, message: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{target.v1}{path}", content=content, headers={"Content-Type": "application/json"},
                          timeout=TIMEOUT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    assert error["message"] == message if message else error["message"]


def test_prompt_tokens_are_the_ones_the_model_evaluated(client: Any, loopback: OllamaServer) -> None:
    reply = client.completions.create(model=TAG, prompt=PROMPT, max_tokens=3, **GREEDY)
    model = loopback.slots[TAG].model
    assert model is not None
    # Ollama's /v1/completions goes through /api/generate, so the model saw the chat-templated prompt
    text = model.chat_prompt([{"role": "user", "content": PROMPT}])
    assert reply.usage.prompt_tokens == len(model.llm.tokenize(text.encode(), add_bos=True, special=True))
    assert reply.usage.prompt_tokens > len(model.llm.tokenize(PROMPT.encode(), add_bos=True, special=True))


def test_a_failure_while_generating_is_an_openai_error(client: Any, loopback: OllamaServer) -> None:
    loopback.fail_next_generation("llama runner process has terminated")
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=TAG, prompt=PROMPT, max_tokens=4, stream=True, **GREEDY)
    assert caught.value.body == {"message": "llama runner process has terminated", "type": "api_error",
                                 "param": None, "code": None}
    assert client.completions.create(model=TAG, prompt=PROMPT, max_tokens=2, **GREEDY).usage.completion_tokens == 2


# --- llmlab's openai-compat backend through the real openai_api provider ------------------------------------


def test_openai_compat_backend_records_the_servers_usage(target: Target) -> None:
    label = f"openai-compat:{target.v1}#{TAG}"
    spec = ModelSpec(label, "openai-compat", TAG, base_url=target.v1)
    settings = BackendSettings(request_timeout=TIMEOUT, max_retries=0, concurrency=1, seed=1234)
    check_available(spec, settings)
    provider = create_provider(spec, settings)
    provider.initialize()
    try:
        result = provider.generate(GenerationRequest(PROMPT, max_new_tokens=8))
    finally:
        provider.close()
    same = native_generate(target, PROMPT, 8, seed=1234)
    assert result.text == same["response"] and result.text.strip()
    assert result.extra["token_counts"] == "api" and result.extra["finish_reason"] == "length"
    assert result.prompt_tokens == same["prompt_eval_count"] > 0
    assert result.completion_tokens == same["eval_count"] == 8
    assert result.extra["usage"]["total_tokens"] == result.prompt_tokens + result.completion_tokens
