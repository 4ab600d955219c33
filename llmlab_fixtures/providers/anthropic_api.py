"""Anthropic models through the official ``anthropic`` SDK: the Messages API, the prompt as one user message.

The key is ``ANTHROPIC_API_KEY``; the endpoint ``$ANTHROPIC_BASE_URL`` (the SDK's own variable) or
``https://api.anthropic.com``. Streaming gives the time to first token; usage comes from ``message_start``
(input tokens, cache reads) and ``message_delta`` (output tokens).

Decoding: the SDK 2.x sends ``anthropic-version: 2026-10-21``, from which the API refuses sampling parameters
(``temperature``, ``top_p``, ``top_k``) and the SDK no longer has them, so no temperature is sent and the API's
own decoding applies: Anthropic scores are not strictly greedy. Stop sequences must contain non-whitespace:
whitespace-only stops (ARC's ``"\\n"``) are applied here, closing the stream as soon as one appears.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from llmlab_fixtures.providers.base import Backend, GenerationRequest
from llmlab_fixtures.providers.cloud import (
    ApiFailure,
    CloudProvider,
    StopPlan,
    StreamResult,
    TextCollector,
    import_sdk,
    jsonable,
    malformed_failure,
    require_key,
    sdk_connection_failure,
    short_reason,
    status_failure,
    transport_failure,
)

if TYPE_CHECKING:
    from llmlab_fixtures.models.specs import ModelSpec
    from llmlab_fixtures.providers import BackendSettings

BACKENDS = (Backend("anthropic", __name__, rank=60, aliases=("claude",), hosted=True, registry_key="anthropic",
                    price_provider="anthropic", model_families=("claude-",)),)

KEY_VARIABLE = "ANTHROPIC_API_KEY"
DEFAULT_BASE_URL = "https://api.anthropic.com"
MAX_STOP_SEQUENCES = 16  # generous; the API documents no small limit
# error types that can arrive inside a 200 stream, as the HTTP status they stand for
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429, "timeout_error": 504,
                        "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                        "not_found_error": 404, "request_too_large": 413, "billing_error": 402}


def anthropic_base_url() -> str:
    return (os.environ.get("ANTHROPIC_BASE_URL") or "").strip() or DEFAULT_BASE_URL


def check_spec(spec: ModelSpec, settings: BackendSettings) -> None:
    """The key is set and the SDK importable (no request is made)."""
    require_key(spec.label, (KEY_VARIABLE,))
    import_sdk(spec.label, "anthropic", "anthropic")


def make_provider(spec: ModelSpec, settings: BackendSettings) -> AnthropicProvider:
    return AnthropicProvider(spec, settings, require_key(spec.label, (KEY_VARIABLE,)), anthropic_base_url())


def _error_parts(body: Any, fallback: str) -> tuple[str | None, str]:
    """(error type, ``type: message``) from ``{"type": "error", "error": {"type", "message"}}``."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            kind = inner.get("type") if isinstance(inner.get("type"), str) else None
            return kind, short_reason(kind, inner.get("message") or fallback)
    return None, short_reason(fallback)


class AnthropicProvider(CloudProvider):
    """Claude models over the Messages API (streamed)."""

    backend = "anthropic"
    api_name = "anthropic"
    api_kind = "messages"
    sdk_distribution = "anthropic"
    stop_limit = MAX_STOP_SEQUENCES
    stop_whitespace_ok = False

    def _make_client(self) -> Any:
        anthropic = import_sdk(self.label, "anthropic", "anthropic")
        return anthropic.Anthropic(api_key=self.key.value, base_url=self.base_url, timeout=self.timeout,
                                   max_retries=0)

    def _classify(self, exc: BaseException) -> ApiFailure | None:
        import anthropic

        if (failure := sdk_connection_failure(anthropic, exc, self.timeout)) is not None:
            return failure
        if isinstance(exc, anthropic.APIStatusError):
            kind, reason = _error_parts(exc.body, exc.message)
            status = exc.status_code
            if status < 400:  # an error event inside a 200 stream
                status = _STREAM_ERROR_STATUS.get(kind or "", 500)
            return status_failure(status, reason, headers=exc.response.headers, request_id=exc.request_id)
        if isinstance(exc, (anthropic.APIResponseValidationError, ValueError)):
            return malformed_failure(exc)
        return transport_failure(exc)

    def _stream_once(self, client: Any, request: GenerationRequest, plan: StopPlan, started: float) -> StreamResult:
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": request.max_new_tokens,
                                  "messages": [{"role": "user", "content": request.prompt}], "stream": True}
        if plan.sent:
            kwargs["stop_sequences"] = list(plan.sent)
        stream = client.messages.create(**kwargs)
        result = StreamResult(request_id=stream.response.headers.get("request-id"))
        collector = TextCollector(result, plan, started)
        usage: dict[str, Any] = {}
        finished = False
        try:
            for event in stream:
                kind = getattr(event, "type", None)
                if kind == "message_start":
                    usage.update(jsonable(event.message.usage) or {})
                    result.request_id = result.request_id or event.message.id
                elif kind == "content_block_delta":
                    if getattr(event.delta, "type", None) == "text_delta" and collector.add(event.delta.text):
                        break
                elif kind == "message_delta":
                    usage.update(jsonable(event.usage) or {})
                    result.completion_tokens = event.usage.output_tokens
                    result.finish_reason = event.delta.stop_reason
                elif kind == "message_stop":
                    finished = True
        finally:
            stream.close()
        if not finished and not result.stopped_locally:
            raise ApiFailure("connection", "the stream ended before message_stop")
        if result.stopped_locally:
            result.completion_tokens = None  # closed before message_delta: counted from the stream
        result.usage = usage or None
        if "input_tokens" in usage:
            cached = int(usage.get("cache_read_input_tokens") or 0)
            result.prompt_tokens = int(usage["input_tokens"]) + int(usage.get("cache_creation_input_tokens") or 0) \
                + cached
            result.cached_tokens = cached
        return result
