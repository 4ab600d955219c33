"""OpenAI (Chat Completions) and OpenAI-compatible servers (legacy Completions), through the official ``openai`` SDK.

- ``openai:<model>`` sends the prompt as one user message to Chat Completions at ``$OPENAI_BASE_URL`` (the SDK's
  own variable; default ``https://api.openai.com/v1``) with the key in ``OPENAI_API_KEY``.
- ``openai-compat:<base_url>#<model>`` sends the raw prompt to the legacy Completions endpoint
  (``POST <base_url>/completions``), which vLLM, llama.cpp's server, llama-cpp-python's server, LM Studio and
  Ollama's ``/v1`` all serve; the model sees exactly the text the in-process backends score (except behind Ollama's
  ``/v1``, which wraps a completions prompt in the model's chat template, as its ``/api/generate`` does). The key is
  ``LLMLAB_OPENAI_COMPAT_API_KEY`` if set, else a placeholder: ``OPENAI_API_KEY`` is never sent to such a host.

Both stream (time to first token), ask for usage with ``stream_options.include_usage`` (servers that ignore it,
such as llama-cpp-python's, get their completion tokens counted from the stream and report no prompt tokens),
decode greedily (temperature 0, ``seed``; openai-compat also sends ``repeat_penalty: 1.0``, because llama.cpp-based
servers default to 1.1), send at most 4 stop strings (the API's limit) and cut the text at all of them here.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.providers import prompt_logprobs
from llmlab_fixtures.providers.base import Backend, GenerationRequest, LoglikelihoodRequest, LoglikelihoodResult
from llmlab_fixtures.providers.cloud import (
    ApiFailure,
    ApiKey,
    ApiRequestFailed,
    CloudProvider,
    RetryOutcome,
    StopPlan,
    StreamResult,
    TextCollector,
    import_sdk,
    jsonable,
    malformed_failure,
    optional_key,
    require_key,
    run_with_retries,
    sdk_connection_failure,
    short_reason,
    status_failure,
    transport_failure,
)
from llmlab_fixtures.providers.fleet import Fleet
from llmlab_fixtures.run.network import is_loopback_host

if TYPE_CHECKING:
    from llmlab_fixtures.models.specs import ModelSpec
    from llmlab_fixtures.providers import BackendSettings

BACKENDS = (
    Backend("openai", __name__, rank=40, hosted=True, registry_key="openai", price_provider="openai",
            model_families=("gpt-", "o1", "o3", "o4")),
    Backend("openai-compat", __name__, rank=50, hosted=True, url_spec=True, registry_key="openai-compat",
            loglik_check="loglikelihood_defect"),
)

OPENAI_KEY_VARIABLE = "OPENAI_API_KEY"
COMPAT_KEY_VARIABLE = "LLMLAB_OPENAI_COMPAT_API_KEY"
COMPAT_PLACEHOLDER_KEY = "llmlab-no-key"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
CHECK_TIMEOUT_S = 5.0


def openai_base_url() -> str:
    """Where ``openai:`` models go: ``$OPENAI_BASE_URL`` (as the SDK reads it) or the OpenAI API."""
    return (os.environ.get("OPENAI_BASE_URL") or "").strip() or OPENAI_DEFAULT_BASE_URL


def _compat_key(spec: ModelSpec) -> ApiKey:
    """A registry-hosted model's own variable (required, e.g. GROQ_API_KEY), else the optional compat key."""
    if spec.api_key_env:
        return require_key(spec.label, (spec.api_key_env,))
    return optional_key(COMPAT_KEY_VARIABLE, COMPAT_PLACEHOLDER_KEY)


def check_spec(spec: ModelSpec, settings: BackendSettings) -> None:
    """Key and SDK for ``openai``; SDK, a reachable endpoint and a served model for ``openai-compat`` (with
    ``--scoring loglik``, also prompt log-probabilities the probe accepts)."""
    if spec.backend == "openai-compat":
        key = _compat_key(spec)
        import_sdk(spec.label, "openai", "openai")
        for url in spec.urls:  # every server of a fleet
            _check_compat_endpoint(spec, url, settings, key)
        if settings.scoring == "loglik" and (defect := loglikelihood_defect(spec, settings)):
            raise ModelUnavailable(f"model {spec.label}: --scoring loglik needs prompt log-probabilities, but "
                                   f"{defect}; use --scoring generate")
        return
    require_key(spec.label, (OPENAI_KEY_VARIABLE,))
    import_sdk(spec.label, "openai", "openai")


def _check_compat_endpoint(spec: ModelSpec, url: str | None, settings: BackendSettings, key: ApiKey) -> None:
    """GET <url>/models within a few seconds; the model must be among the served ones if any are listed."""
    base_url = (url or "").rstrip("/")
    headers = {"Authorization": f"Bearer {key.value}"} if key.variable else {}
    loopback = is_loopback_host(urlparse(base_url).hostname)
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))
    timeout = min(CHECK_TIMEOUT_S, float(settings.request_timeout))
    try:
        with opener.open(urllib.request.Request(f"{base_url}/models", headers=headers), timeout=timeout) as response:
            listing = json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ModelUnavailable(_compat_key_line(spec.label, base_url, key, exc.code)) from None
        return  # the server answers but lists no models (404, 405, ...): the first request will tell
    except (urllib.error.URLError, OSError, ValueError):
        raise ModelUnavailable(f"cannot reach {base_url}: start the server or fix the URL") from None
    served = [str(m.get("id")) for m in listing.get("data", []) if isinstance(m, dict) and m.get("id")] \
        if isinstance(listing, dict) and isinstance(listing.get("data"), list) else []
    if served and spec.target not in served and f"{spec.target}:latest" not in served:  # Ollama lists name:tag
        raise ModelUnavailable(f"model {spec.label}: {base_url} does not serve {spec.target!r}; it serves "
                               f"{', '.join(served[:10])} (write openai-compat:{base_url}#<one of them>)")


def loglikelihood_defect(spec: ModelSpec, settings: BackendSettings) -> str | None:
    """None when every server of ``spec`` returns correctly aligned prompt log-probabilities for ``spec.target``
    (one probe request per server and model), else the first server's URL and what is wrong with its values."""
    key = _compat_key(spec).value
    for url in spec.urls:
        base_url = url.rstrip("/")
        if defect := _probe(base_url, spec.target, key, float(settings.request_timeout), settings.seed):
            return f"{base_url}: {defect}"
    return None


def _sdk_client(openai: Any, key: str, base_url: str, timeout: float, max_retries: int, *, compat: bool) -> Any:
    """The SDK's client; for another host than OpenAI's, nothing of the user's OpenAI account (org, project)."""
    client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)
    if compat:
        client.organization = None
        client.project = None
    return client


@cache
def _probe(base_url: str, model: str, key: str, timeout: float, seed: int) -> str | None:
    openai = import_sdk(model, "openai", "openai")
    client = _sdk_client(openai, key, base_url, timeout, 1, compat=True)
    prompt = prompt_logprobs.probe_prompt()
    try:
        response = client.completions.create(**prompt_logprobs.request_body(model, prompt, seed))
        return prompt_logprobs.probe_defect(prompt_logprobs.prompt_tokens(prompt_logprobs.first_choice(response),
                                                                          prompt))
    except prompt_logprobs.NoPromptLogprobs as exc:
        return str(exc)
    except openai.APIStatusError as exc:
        return f"it refused a request for prompt log-probabilities ({exc.status_code}: " \
               f"{_error_reason(exc.body, exc.message)})"
    except openai.APIError as exc:
        return f"the request for prompt log-probabilities failed: {short_reason(type(exc).__name__, exc)}"
    finally:
        client.close()


def _compat_key_line(label: str, base_url: str, key: ApiKey, status: int) -> str:
    if key.variable is None:
        return f"model {label}: {base_url} requires an API key ({status}); set it in {COMPAT_KEY_VARIABLE}"
    return f"model {label}: {base_url} rejected the key in {key.variable} ({status}); check it or replace it"


def make_provider(spec: ModelSpec, settings: BackendSettings) -> CloudProvider | Fleet:
    if spec.backend == "openai-compat":
        members = [OpenAICompatProvider(spec, settings, _compat_key(spec), url.rstrip("/")) for url in spec.urls]
        return members[0] if len(members) == 1 else Fleet(members, spec.label)
    return OpenAIChatProvider(spec, settings, require_key(spec.label, (OPENAI_KEY_VARIABLE,)), openai_base_url())


def _error_reason(body: Any, fallback: str) -> str:
    """``type: message`` from an OpenAI-style error body (``{"error": {...}}``, the inner dict, or ``{"detail"}``)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail") or body.get("detail")
            return short_reason(inner.get("type") or inner.get("code"), message or fallback)
        if isinstance(inner, str):
            return short_reason(inner)
    if isinstance(body, str):
        return short_reason(body)
    return short_reason(fallback)


class _OpenAIBase(CloudProvider):
    """The SDK client and failure classification both OpenAI flavours share."""

    sdk_distribution = "openai"
    stop_limit = 4

    def _make_client(self) -> Any:
        openai = import_sdk(self.label, "openai", "openai")
        return _sdk_client(openai, self.key.value, self.base_url, self.timeout, 0,
                           compat=self.spec.backend == "openai-compat")

    def _classify(self, exc: BaseException) -> ApiFailure | None:
        import openai

        if (failure := sdk_connection_failure(openai, exc, self.timeout)) is not None:
            return failure
        if isinstance(exc, openai.APIStatusError):
            return status_failure(exc.status_code, _error_reason(exc.body, exc.message),
                                  headers=exc.response.headers, request_id=exc.request_id)
        if isinstance(exc, openai.APIResponseValidationError):
            return malformed_failure(exc)
        if isinstance(exc, openai.APIError):  # an error event inside a 200 stream
            code = exc.body.get("code") if isinstance(exc.body, dict) else None
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            return status_failure(status, _error_reason(exc.body, exc.message))
        if isinstance(exc, ValueError):  # a data line that is not JSON
            return malformed_failure(exc)
        return transport_failure(exc)

    @staticmethod
    def _read_usage(result: StreamResult, usage: Any) -> None:
        result.usage = jsonable(usage)
        result.prompt_tokens = getattr(usage, "prompt_tokens", None)
        result.completion_tokens = getattr(usage, "completion_tokens", None)
        details = getattr(usage, "prompt_tokens_details", None)
        result.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0)

    def _consume(self, stream: Any, plan: StopPlan, started: float, text_of: Any) -> StreamResult:
        """Read a chunk stream into a StreamResult; a stream without a finish_reason was cut short."""
        result = StreamResult(request_id=stream.response.headers.get("x-request-id"))
        collector = TextCollector(result, plan, started)
        try:
            for chunk in stream:
                result.request_id = result.request_id or getattr(chunk, "id", None)
                if getattr(chunk, "usage", None) is not None:
                    self._read_usage(result, chunk.usage)
                for choice in chunk.choices or []:
                    if choice.index != 0:
                        continue
                    if collector.add(text_of(choice)):
                        return result
                    if choice.finish_reason:
                        result.finish_reason = str(choice.finish_reason)
        finally:
            stream.close()
        if result.finish_reason is None:
            raise ApiFailure("connection", "the stream ended before a finish_reason")
        return result


class OpenAIChatProvider(_OpenAIBase):
    """``openai:<model>``: Chat Completions, the prompt as a single user message."""

    backend = "openai"
    api_name = "openai"
    api_kind = "chat.completions"

    def _stream_once(self, client: Any, request: GenerationRequest, plan: StopPlan, started: float) -> StreamResult:
        kwargs: dict[str, Any] = {
            "model": self.model, "messages": [{"role": "user", "content": request.prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "seed": self.seed,
            "max_completion_tokens": request.max_new_tokens,
        }
        if urlparse(self.base_url).hostname != OPENAI_HOST:  # proxies and local servers may predate the new name
            kwargs["max_tokens"] = request.max_new_tokens
        if plan.sent:
            kwargs["stop"] = list(plan.sent)
        stream = client.chat.completions.create(**kwargs)
        return self._consume(stream, plan, started, lambda choice: choice.delta.content if choice.delta else None)


class OpenAICompatProvider(_OpenAIBase):
    """``openai-compat:<base_url>#<model>``: legacy Completions with the raw prompt (the text local backends score)."""

    backend = "openai-compat"
    api_name = "openai-compat"
    api_kind = "completions"

    def _stream_once(self, client: Any, request: GenerationRequest, plan: StopPlan, started: float) -> StreamResult:
        kwargs: dict[str, Any] = {
            "model": self.model, "prompt": request.prompt, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "seed": self.seed, "max_tokens": request.max_new_tokens,
            # llama.cpp-based servers (llama-cpp-python, Ollama) default to a 1.1 repetition penalty, which is not
            # greedy decoding; 1.0 is the neutral value wherever the field is known and is ignored elsewhere
            "extra_body": {"repeat_penalty": 1.0},
        }
        if plan.sent:
            kwargs["stop"] = list(plan.sent)
        stream = client.completions.create(**kwargs)
        return self._consume(stream, plan, started, lambda choice: choice.text)

    @property
    def supports_loglikelihood(self) -> bool:  # type: ignore[override]
        """Whether the server's prompt log-probabilities passed the probe (see prompt_logprobs)."""
        return loglikelihood_defect(self.spec, self.settings) is None

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Each request scored from the server's echoed prompt log-probabilities, ``concurrency`` in flight."""
        if len(requests) <= 1 or self.max_concurrency == 1:
            return [self._score(request) for request in requests]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._score, requests))

    def _score(self, request: LoglikelihoodRequest) -> LoglikelihoodResult:
        prompt = request.context + request.continuation
        client = self.client
        outcome = RetryOutcome()

        def attempt() -> Any:
            return client.completions.create(**prompt_logprobs.request_body(self.model, prompt, self.seed))

        try:
            response = run_with_retries(attempt, self._classify, self.retry_policy, outcome)
        except ApiFailure as failure:
            raise self._failure_error(failure, outcome.retries) from None
        try:
            echoed = prompt_logprobs.prompt_tokens(prompt_logprobs.first_choice(response), prompt)
            return prompt_logprobs.score(echoed, len(request.context))
        except prompt_logprobs.NoPromptLogprobs as exc:
            raise ApiRequestFailed(f"model {self.label}: {self.base_url}: {exc}", kind="malformed") from None
