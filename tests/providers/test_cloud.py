"""Cloud backends through the official SDKs, unmodified, against real servers on loopback.

openai-compat and openai (chat) talk to llama-cpp-python's own OpenAI-compatible server; anthropic and google
talk to llmlab's loopback stand-ins (a real SmolLM2 behind the documented wire formats, with scripted faults).
Nothing here may leave 127.0.0.1: every base URL is loopback and a NetworkGuard refuses anything else.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from llmlab_fixtures.errors import CredentialsMissing, ModelUnavailable
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.specs import ModelSpec
from llmlab_fixtures.providers import BackendSettings, GenerationRequest, check_available, create_provider
from llmlab_fixtures.providers.cloud import (
    ApiRequestFailed,
    CloudProvider,
    RetryPolicy,
    parse_retry_after,
    plan_stops,
)
from llmlab_fixtures.run.network import NetworkGuard
from llmlab_fixtures.testing.anthropic_server import running_anthropic_server
from llmlab_fixtures.testing.backing_model import BackingModel
from llmlab_fixtures.testing.google_server import running_google_server
from llmlab_fixtures.testing.loopback import Fault, LoopbackServer, load_backing
from llmlab_fixtures.testing.no_repack import load_llama
from llmlab_fixtures.testing.openai_server import running_llama_cpp_openai_server

SECRET = "sk-test-SECRET123"
WRONG = "sk-test-WRONG456"
ENV_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ADMIN_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
                 "OPENAI_CUSTOM_HEADERS", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL",
                 "ANTHROPIC_CUSTOM_HEADERS", "ANTHROPIC_PROFILE", "GOOGLE_API_KEY", "GEMINI_API_KEY",
                 "GOOGLE_GEMINI_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE",
                 "LLMLAB_OPENAI_COMPAT_API_KEY")
NOWHERE = "http://127.0.0.1:9"  # loopback, nothing listens: the default for every SDK in these tests
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _loopback_only() -> Iterator[NetworkGuard]:
    """Refuse every connection (and name lookup) that would leave this machine."""
    guard = NetworkGuard()
    guard.install()
    yield guard
    guard.uninstall()
    assert not guard.blocked, f"tests tried to leave the machine: {guard.blocked}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real keys or endpoints from the caller's environment; every SDK points at a dead loopback port."""
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{NOWHERE}/v1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", NOWHERE)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", NOWHERE)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return embedded_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def backing(gguf: Path) -> BackingModel:
    return load_backing(gguf)


@pytest.fixture(scope="module")
def anthropic_server(backing: BackingModel) -> Iterator[LoopbackServer]:
    with running_anthropic_server(backing=backing, api_key=SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def google_server(backing: BackingModel) -> Iterator[LoopbackServer]:
    with running_google_server(backing=backing, api_key=SECRET) as server:
        yield server


@pytest.fixture(scope="module")
def llama_server(gguf: Path) -> Iterator[str]:
    with running_llama_cpp_openai_server(gguf, model_alias="smollm2") as base_url:
        yield base_url


def settings(**overrides: Any) -> BackendSettings:
    values: dict[str, Any] = {"request_timeout": 60.0, "max_retries": 3, "concurrency": 3, "seed": 1234}
    values.update(overrides)
    return BackendSettings(**values)


def fast_retries(provider: CloudProvider) -> CloudProvider:
    """Keep the provider's retry count, shrink its backoff (Retry-After still wins)."""
    provider.retry_policy = RetryPolicy(provider.retry_policy.max_retries, base_delay=0.01, max_delay=0.05)
    return provider


@dataclass(frozen=True)
class Stand:
    """One cloud API stand-in: which backend, where its key and base URL go, and its error wording."""

    backend: str
    target: str
    key_variable: str
    url_variable: str
    overloaded: int  # the status meaning "try later"
    overloaded_reason: str

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.target, self.backend, self.target)


STANDS = {
    "anthropic": Stand("anthropic", "claude-3-haiku", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", 529,
                       "overloaded_error: Overloaded"),
    "google": Stand("google", "gemini-1.5-flash", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", 503,
                    "UNAVAILABLE: The model is overloaded. Please try again later."),
}


@pytest.fixture(params=sorted(STANDS))
def stand(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Stand, LoopbackServer]]:
    """A cloud stand-in with its key and base URL exported, and an empty fault queue."""
    info = STANDS[request.param]
    server: LoopbackServer = request.getfixturevalue(f"{info.backend}_server")
    monkeypatch.setenv(info.key_variable, SECRET)
    monkeypatch.setenv(info.url_variable, server.base_url)
    server.faults.clear()
    yield info, server
    server.faults.clear()


def provider_for(info: Stand, **overrides: Any) -> CloudProvider:
    provider = create_provider(info.spec, settings(**overrides))
    assert isinstance(provider, CloudProvider)
    provider.initialize()
    return fast_retries(provider)


# --- openai-compat and openai (chat) against llama-cpp-python's server ----------------------------------


def compat_spec(base_url: str, model: str = "smollm2") -> ModelSpec:
    return ModelSpec(f"openai-compat:{base_url}#{model}", "openai-compat", model, base_url=base_url)


@pytest.fixture(scope="module")
def direct_greedy(gguf: Path) -> str:
    """The greedy completion of PROMPT by llama-cpp-python's Llama on the same GGUF, in this process."""
    llm = load_llama(gguf, n_ctx=2048, n_threads=1, n_threads_batch=1, seed=0, verbose=False)
    try:
        return llm.create_completion(PROMPT, max_tokens=12, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_compat_generation_is_the_greedy_completion_of_the_raw_prompt(llama_server: str, direct_greedy: str) -> None:
    spec = compat_spec(llama_server)
    check_available(spec, settings())
    provider = create_provider(spec, settings())
    provider.initialize()
    first = provider.generate(GenerationRequest(PROMPT, max_new_tokens=12))
    second = provider.generate(GenerationRequest(PROMPT, max_new_tokens=12))
    assert first.text.strip(), "the server generated nothing"
    assert first.text == direct_greedy
    assert second.text == first.text
    assert first.completion_tokens == 12 and first.extra["finish_reason"] == "length"
    assert first.extra["token_counts"].startswith("stream chunks")  # llama-cpp-python sends no stream usage
    assert first.extra["retries"] == 0 and first.extra["request_id"]
    assert first.ttft_s is not None and 0 < first.ttft_s <= first.total_s
    assert provider.max_concurrency == 3 and provider.supports_loglikelihood is False
    assert provider.estimate_memory() == 0
    info = provider.get_model_info()
    port = llama_server.split(":")[2].split("/")[0]
    assert info.name == "openai-compat:smollm2" and info.backend == "openai-compat"
    assert info.data_location == f"loopback 127.0.0.1:{port}"
    assert info.extra["api_model"] == "smollm2" and info.extra["base_url"] == f"127.0.0.1:{port}"
    assert info.extra["api"] == "completions"
    provider.close()


def test_compat_stop_strings_beyond_the_api_limit_are_cut_here(llama_server: str, direct_greedy: str) -> None:
    word = direct_greedy.split()[2]  # a word from the middle of the greedy text
    expected = direct_greedy[: direct_greedy.index(word)]
    provider = create_provider(compat_spec(llama_server), settings())
    sent = provider.generate(GenerationRequest(PROMPT, stop=("@@", word), max_new_tokens=12))
    assert sent.text == expected and not sent.extra.get("stopped_locally")
    local = provider.generate(GenerationRequest(PROMPT, stop=("@@", "##", "%%", "&&", word), max_new_tokens=12))
    assert local.text == expected
    assert local.extra["local_stops"] == [word] and local.extra["stopped_locally"] is True


def test_compat_never_sends_the_openai_key(llama_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    provider = create_provider(compat_spec(llama_server), settings())
    provider.initialize()
    assert provider.client.api_key != SECRET and provider.key.variable is None
    assert provider.generate(GenerationRequest(PROMPT, max_new_tokens=2)).completion_tokens == 2
    monkeypatch.setenv("LLMLAB_OPENAI_COMPAT_API_KEY", "compat-key-789")
    with_key = create_provider(compat_spec(llama_server), settings())
    assert with_key.client.api_key == "compat-key-789" and with_key.key.variable == "LLMLAB_OPENAI_COMPAT_API_KEY"


def test_compat_check_names_the_served_models_or_the_dead_url(llama_server: str) -> None:
    with pytest.raises(ModelUnavailable) as wrong_model:
        check_available(compat_spec(llama_server, "llama-70b"), settings())
    assert str(wrong_model.value) == (f"model openai-compat:llama-70b: {llama_server} does not serve 'llama-70b'; it "
                                      f"serves smollm2 (write openai-compat:{llama_server}#<one of them>)")
    with pytest.raises(ModelUnavailable) as dead:
        check_available(compat_spec(f"{NOWHERE}/v1"), settings())
    assert str(dead.value) == f"cannot reach {NOWHERE}/v1: start the server or fix the URL"


def test_openai_chat_path_through_openai_base_url(llama_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", llama_server)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    spec = ModelSpec("gpt-4o-mini", "openai", "smollm2")
    check_available(spec, settings())
    provider = create_provider(spec, settings())
    first = provider.generate(GenerationRequest(QUESTION, stop=("\n",), max_new_tokens=10))
    second = provider.generate(GenerationRequest(QUESTION, stop=("\n",), max_new_tokens=10))
    assert first.text.strip() and first.text == second.text and "\n" not in first.text
    assert 0 < first.completion_tokens <= 10 and first.ttft_s is not None
    info = provider.get_model_info()
    assert info.name == "smollm2" and info.backend == "openai" and info.extra["api"] == "chat.completions"
    assert info.data_location.startswith("loopback 127.0.0.1:")
    assert SECRET not in json.dumps(asdict(info)) + json.dumps(first.extra)


def test_openai_default_endpoint_is_the_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    info = create_provider(ModelSpec("gpt-4o-mini", "openai", "gpt-4o-mini"), settings()).get_model_info()
    assert info.data_location == "cloud api.openai.com" and info.extra["base_url"] == "api.openai.com"


# --- anthropic and google against their loopback stand-ins ---------------------------------------------


def test_streaming_generation(stand: tuple[Stand, LoopbackServer], backing: BackingModel) -> None:
    info, server = stand
    provider = provider_for(info)
    result = provider.generate(GenerationRequest(QUESTION, stop=("\n",), max_new_tokens=12))
    chat = backing.chat_prompt([{"role": "user", "content": QUESTION}])
    assert result.text.strip() and "\n" not in result.text
    assert result.prompt_tokens == backing.count_tokens(chat)
    assert 0 < result.completion_tokens <= 12
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.total_s
    assert result.extra["retries"] == 0 and result.extra["request_id"] and result.extra["usage"]
    request = server.requests[-1]
    if info.backend == "anthropic":
        assert request.path == "/v1/messages" and request.headers["anthropic-version"]
        assert request.body["messages"] == [{"role": "user", "content": QUESTION}]
        assert "stop_sequences" not in request.body  # "\n" is whitespace: cut here, not sent
        assert result.extra["local_stops"] == ["\n"]
    else:
        assert request.path.endswith("/models/gemini-1.5-flash:streamGenerateContent?alt=sse")
        config = request.body["generationConfig"]
        assert config["temperature"] == 0 and config["maxOutputTokens"] == 12 and config["seed"] == 1234
        assert config["stopSequences"] == ["\n"]
    info_ = provider.get_model_info()
    assert info_.data_location == f"loopback {server.base_url.removeprefix('http://')}"
    assert info_.extra["api_model"] == info.target


def test_rate_limit_then_success_honours_retry_after(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info)
    server.faults.push(Fault.error(429, retry_after=1))
    started = time.perf_counter()
    result = provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert time.perf_counter() - started >= 1.0  # the server's Retry-After, not the 0.01 s backoff
    assert result.extra["retries"] == 1 and result.text
    assert result.extra["retried_failures"][0].startswith("429 ")


def test_server_errors_then_success(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info)
    server.faults.push(Fault.error(500), Fault.error(info.overloaded))
    result = provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert result.extra["retries"] == 2 and result.text
    assert [f.split()[0] for f in result.extra["retried_failures"]] == ["500", str(info.overloaded)]


def test_timeout_then_success(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info, request_timeout=3.0, max_retries=3)
    server.faults.push(Fault.delay(6))
    result = provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert result.extra["retries"] >= 1 and result.extra["retried_failures"][0].startswith("timeout")
    assert result.text


def test_connection_dropped_mid_stream_is_retried(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info)
    server.faults.push(Fault.drop(after_pieces=1))
    result = provider.generate(GenerationRequest(QUESTION, max_new_tokens=6))
    assert result.extra["retries"] == 1 and result.extra["retried_failures"][0].startswith("connection error")
    assert result.text


def test_error_event_inside_the_stream_is_retried(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info)
    server.faults.push(Fault.stream_error(info.overloaded, after_pieces=1))
    result = provider.generate(GenerationRequest(QUESTION, max_new_tokens=6))
    assert result.extra["retries"] == 1 and result.text
    assert result.extra["retried_failures"] == [f"{info.overloaded} {info.overloaded_reason}"]


def test_retries_exhausted_is_one_line(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info, max_retries=2)
    server.faults.push(*[Fault.error(info.overloaded)] * 3)
    seen = len(server.requests)
    with pytest.raises(ApiRequestFailed) as failed:
        provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert str(failed.value) == (f"model {info.target}: {info.backend} API failed after 2 retries: "
                                 f"{info.overloaded} {info.overloaded_reason}")
    assert failed.value.retries == 2 and len(server.requests) - seen == 3 and len(server.faults) == 0


def test_malformed_body_is_a_clear_error_without_retries(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info)
    server.faults.push(Fault.malformed())
    seen = len(server.requests)
    with pytest.raises(ApiRequestFailed) as failed:
        provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert str(failed.value).startswith(f"model {info.target}: {info.backend} API returned a malformed response: ")
    assert "\n" not in str(failed.value) and len(server.requests) - seen == 1
    assert provider.generate(GenerationRequest(QUESTION, max_new_tokens=2)).text  # the provider still works


def test_rejected_key_names_the_variable_not_the_key(stand: tuple[Stand, LoopbackServer],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    info, server = stand
    monkeypatch.setenv(info.key_variable, WRONG)
    provider = provider_for(info)
    seen = len(server.requests)
    with pytest.raises(ApiRequestFailed) as failed:
        provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    message = str(failed.value)
    assert message.startswith(f"model {info.target}: the API rejected the key in {info.key_variable} (")
    assert message.endswith("); check it or replace it") and WRONG not in message
    assert len(server.requests) - seen == 1  # not retried


def test_google_401_and_gemini_api_key(google_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", google_server.base_url)
    provider = provider_for(STANDS["google"])
    assert provider.key.variable == "GEMINI_API_KEY"
    google_server.faults.push(Fault.error(401))
    with pytest.raises(ApiRequestFailed) as failed:
        provider.generate(GenerationRequest(QUESTION, max_new_tokens=4))
    assert str(failed.value) == ("model gemini-1.5-flash: the API rejected the key in GEMINI_API_KEY (401 "
                                 "UNAUTHENTICATED: Request had invalid authentication credentials.); check it or "
                                 "replace it")


def test_concurrent_generate_calls_share_one_client(stand: tuple[Stand, LoopbackServer]) -> None:
    info, server = stand
    provider = provider_for(info, concurrency=4)
    server.faults.push(Fault.error(429, retry_after=0), Fault.error(500))
    requests = [GenerationRequest(f"{QUESTION} ({i})", max_new_tokens=3) for i in range(4)]
    with ThreadPoolExecutor(max_workers=provider.max_concurrency) as pool:
        results = list(pool.map(provider.generate, requests))
    assert all(r.text for r in results) and sum(r.extra["retries"] for r in results) == 2


# --- keys ----------------------------------------------------------------------------------------------

MISSING = {
    "openai": ("gpt-4o-mini", "OPENAI_API_KEY"),
    "anthropic": ("claude-3-haiku", "ANTHROPIC_API_KEY"),
    "google": ("gemini-1.5-flash", "GOOGLE_API_KEY (or GEMINI_API_KEY)"),
}


@pytest.mark.parametrize("backend", sorted(MISSING))
def test_missing_key(backend: str) -> None:
    target, variables = MISSING[backend]
    spec = ModelSpec(target, backend, target)
    expected = f"model {target}: {variables} is not set; export it (or drop the model) — the other models still run"
    with pytest.raises(CredentialsMissing) as checked:
        check_available(spec, settings())
    assert str(checked.value) == expected
    with pytest.raises(CredentialsMissing) as created:
        create_provider(spec, settings())
    assert str(created.value) == expected


@pytest.mark.parametrize(("backend", "module", "pip_name"), [("openai", "openai", "openai"),
                                                             ("anthropic", "anthropic", "anthropic"),
                                                             ("google", "google.genai", "google-genai")])
def test_missing_sdk_names_the_pip_command(backend: str, module: str, pip_name: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    target, _ = MISSING[backend]
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ModelUnavailable) as missing:
        check_available(ModelSpec(target, backend, target), settings())
    assert f"pip install {pip_name}" in str(missing.value) and not isinstance(missing.value, CredentialsMissing)


def test_keys_never_appear_in_errors_results_info_or_logs(anthropic_server: LoopbackServer,
                                                          google_server: LoopbackServer, llama_server: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_server.base_url)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", google_server.base_url)
    monkeypatch.setenv("OPENAI_BASE_URL", llama_server)
    monkeypatch.setenv("LLMLAB_OPENAI_COMPAT_API_KEY", SECRET)  # llama-cpp-python's server ignores it
    texts: list[str] = []
    for key in (SECRET, WRONG):
        for name in ("ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY"):
            monkeypatch.setenv(name, key)
        specs = [STANDS["anthropic"].spec, STANDS["google"].spec, ModelSpec("gpt-4o-mini", "openai", "smollm2"),
                 compat_spec(llama_server)]
        for spec in specs:
            provider = fast_retries(create_provider(spec, settings(max_retries=1)))
            servers = {"anthropic": anthropic_server, "google": google_server}
            faults = [[], [Fault.error(429), Fault.error(500)], [Fault.malformed()],
                      [Fault.error(400, message=f"echo {key}")]]
            for scripted in faults if spec.backend in servers else [[]]:
                if spec.backend in servers:
                    servers[spec.backend].faults.clear()
                    servers[spec.backend].faults.push(*scripted)
                try:
                    result = provider.generate(GenerationRequest(QUESTION, stop=("\n",), max_new_tokens=3))
                    texts.append(json.dumps(result.extra, default=str) + repr(result))
                except Exception as exc:
                    texts.append(str(exc) + repr(exc) + "".join(traceback.format_exception(exc)))
            texts.append(json.dumps(asdict(provider.get_model_info()), default=str) + repr(provider.key))
            provider.close()
    texts.append(caplog.text)
    joined = "\n".join(texts)
    assert "failed after 1 retries" in joined and "malformed response" in joined and "rejected the key" in joined
    assert "[redacted]" in joined  # the 400 that echoed the key was scrubbed
    assert SECRET not in joined and WRONG not in joined


# --- helpers -------------------------------------------------------------------------------------------


def test_stop_plans_respect_each_api() -> None:
    openai = plan_stops(["a", "b", "", "c", "d", "e", "a"], limit=4)
    assert openai.sent == ("a", "b", "c", "d") and openai.local_only == ("e",)
    anthropic = plan_stops(["\n", "Question:", " "], limit=16, whitespace_ok=False)
    assert anthropic.sent == ("Question:",) and anthropic.local_only == ("\n", " ")
    google = plan_stops([str(i) for i in range(7)], limit=5)
    assert len(google.sent) == 5 and google.all == tuple(str(i) for i in range(7))


def test_retry_after_and_backoff() -> None:
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after(None) is None
    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=8.0, max_retry_after=30.0)
    for retry in range(6):
        ceiling = min(8.0, 2.0 ** retry)
        assert ceiling / 2 <= policy.delay(retry) <= ceiling
    assert policy.delay(0, retry_after=100.0) == 30.0


# --- the plugin, end to end ----------------------------------------------------------------------------


def test_benchmark_run_against_llama_cpp_server(bench_pytester: pytest.Pytester, data_dir: Path,
                                                llama_server: str) -> None:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge", f"--models=openai-compat:{llama_server}#smollm2", "--limit=3",
        f"--data-dir={data_dir}", f"--output-dir={out}", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines(["*llmlab comparison (generate scoring)*", "dataset (metric)*openai-compat:smollm2*"])
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 3 and all(i["error"] is None and i["response"] is not None for i in items)
    assert {i["backend"] for i in items} == {"openai-compat"}
    results = json.loads((out / "results.json").read_text())
    assert re.fullmatch(r"loopback 127\.0\.0\.1:\d+", results["models"]["openai-compat:smollm2"]["data_location"])
