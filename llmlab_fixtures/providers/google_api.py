"""Gemini models through the official ``google-genai`` SDK (``generate_content_stream``, the Gemini Developer API).

The key is ``GOOGLE_API_KEY`` or else ``GEMINI_API_KEY`` (the SDK's own order). The endpoint is
``$GOOGLE_GEMINI_BASE_URL`` — the variable google-genai 3.6.1 reads itself (``google/genai/_base_url.py``) —
or ``https://generativelanguage.googleapis.com``; llmlab passes it on as ``HttpOptions(base_url=...)`` so the
privacy column and the SDK agree. The SDK calls API version ``v1`` by default (``GOOGLE_GENAI_API_VERSION``
changes it). Vertex AI is not used (``vertexai=False``, whatever ``GOOGLE_GENAI_USE_VERTEXAI`` says).

Requests: ``GenerateContentConfig(temperature=0, max_output_tokens, stop_sequences (at most 5), seed,
candidate_count=1)``; usage from ``usageMetadata``. The SDK's retries stay off (no ``HttpRetryOptions``):
llmlab's one retry policy applies, also honouring a 429's ``google.rpc.RetryInfo.retryDelay``.
"""

from __future__ import annotations

import json
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
    parse_duration,
    require_key,
    short_reason,
    status_failure,
    transport_failure,
)

if TYPE_CHECKING:
    from llmlab_fixtures.models.specs import ModelSpec
    from llmlab_fixtures.providers import BackendSettings

BACKENDS = (Backend("google", __name__, rank=70, aliases=("gemini",), hosted=True, registry_key="google",
                    price_provider="google", model_families=("gemini-",)),)

KEY_VARIABLES = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
BASE_URL_VARIABLE = "GOOGLE_GEMINI_BASE_URL"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
MAX_STOP_SEQUENCES = 5


def google_base_url() -> str:
    return (os.environ.get(BASE_URL_VARIABLE) or "").strip() or DEFAULT_BASE_URL


def check_spec(spec: ModelSpec, settings: BackendSettings) -> None:
    """A key is set and the SDK importable (no request is made)."""
    require_key(spec.label, KEY_VARIABLES)
    import_sdk(spec.label, "google.genai", "google-genai")


def make_provider(spec: ModelSpec, settings: BackendSettings) -> GoogleProvider:
    return GoogleProvider(spec, settings, require_key(spec.label, KEY_VARIABLES), google_base_url())


def _retry_delay(details: Any) -> float | None:
    """``retryDelay`` of a ``google.rpc.RetryInfo`` in an error body's details."""
    error = details.get("error", details) if isinstance(details, dict) else None
    for item in (error or {}).get("details", []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            return parse_duration(item.get("retryDelay"))
    return None


def _key_rejected(code: int, message: str, details: Any) -> bool:
    """Google answers a wrong key with 400 INVALID_ARGUMENT / API_KEY_INVALID, a missing one with 403."""
    if code in (401, 403):
        return True
    text = json.dumps(details, default=str) if details is not None else ""
    return code == 400 and ("API_KEY_INVALID" in text or "API key not valid" in (message or ""))


class GoogleProvider(CloudProvider):
    """Gemini models over generateContent (streamed, server-sent events)."""

    backend = "google"
    api_name = "google"
    api_kind = "streamGenerateContent"
    sdk_distribution = "google-genai"
    stop_limit = MAX_STOP_SEQUENCES

    def _make_client(self) -> Any:
        import_sdk(self.label, "google.genai", "google-genai")
        from google import genai
        from google.genai import types

        options = types.HttpOptions(base_url=self.base_url, timeout=max(1, round(self.timeout * 1000)))
        return genai.Client(api_key=self.key.value, vertexai=False, http_options=options)

    def _classify(self, exc: BaseException) -> ApiFailure | None:
        from google.genai import errors

        unparsable = getattr(errors, "UnknownApiResponseError", None)  # not in every google-genai 1.x
        if unparsable is not None and isinstance(exc, unparsable):
            return malformed_failure(exc)
        if isinstance(exc, errors.APIError):
            code = int(exc.code or 500)
            headers = getattr(getattr(exc, "response", None), "headers", None)
            failure = status_failure(code, short_reason(exc.status, exc.message),
                                     headers=headers if hasattr(headers, "items") else None,
                                     auth=_key_rejected(code, exc.message or "", exc.details))
            if failure.retry_after is None:
                failure.retry_after = _retry_delay(exc.details)
            return failure
        if isinstance(exc, ValueError):  # pydantic validation or JSON errors: a body that is not a response
            return malformed_failure(exc)
        return transport_failure(exc)

    def _stream_once(self, client: Any, request: GenerationRequest, plan: StopPlan, started: float) -> StreamResult:
        from google.genai import types

        config = types.GenerateContentConfig(temperature=0, max_output_tokens=request.max_new_tokens,
                                             stop_sequences=list(plan.sent) or None, seed=self.seed,
                                             candidate_count=1)
        stream = client.models.generate_content_stream(model=self.model, contents=request.prompt, config=config)
        result = StreamResult()
        collector = TextCollector(result, plan, started)
        try:
            for chunk in stream:
                result.request_id = result.request_id or chunk.response_id
                if chunk.usage_metadata is not None:
                    usage = chunk.usage_metadata
                    result.usage = jsonable(usage)
                    result.prompt_tokens = usage.prompt_token_count
                    result.completion_tokens = usage.candidates_token_count
                    result.cached_tokens = int(usage.cached_content_token_count or 0)
                candidate = chunk.candidates[0] if chunk.candidates else None
                if candidate is None:
                    continue
                parts = candidate.content.parts if candidate.content and candidate.content.parts else []
                if collector.add("".join(p.text for p in parts if p.text and not p.thought)):
                    break
                if candidate.finish_reason is not None:
                    reason = candidate.finish_reason
                    result.finish_reason = str(getattr(reason, "value", reason))
        finally:
            closer = getattr(stream, "close", None)
            if callable(closer):
                closer()
        if result.stopped_locally:
            result.completion_tokens = None
        elif result.finish_reason is None:
            raise ApiFailure("connection", "the stream ended before a finishReason")
        return result
