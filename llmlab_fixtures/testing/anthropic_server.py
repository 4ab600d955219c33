"""A loopback stand-in for the Anthropic Messages API, backed by a real local model, with fault injection.

``POST /v1/messages`` speaks the documented wire format: a JSON ``message`` (``content: [{type: text}]``,
``stop_reason``, ``stop_sequence``, ``usage{input_tokens, output_tokens}``), or with ``"stream": true`` the SSE
events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``),
``content_block_stop``, ``message_delta`` (stop reason and usage) and ``message_stop``. Errors are
``{"type": "error", "error": {"type": ..., "message": ...}}`` with the matching status and a ``request-id`` header.

The key may come in ``x-api-key`` (``anthropic-version: 2023-06-01`` clients) or ``Authorization: Bearer``
(the Python SDK 2.x, which sends ``anthropic-version: 2026-10-21``); ``anthropic-version`` is required. As the
API does from 2026-10-21 on, sampling parameters (temperature, top_p, top_k) are refused for that version;
decoding here is always greedy. Stop sequences must contain non-whitespace, as the API requires.

The generic pieces (faults, the SSE handler, stop scanning) live in ``loopback``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmlab_fixtures.testing.backing_model import BackingModel
from llmlab_fixtures.testing.loopback import (
    Fault,
    Generation,
    LoopbackHandler,
    LoopbackServer,
    new_id,
    serve_api,
    start_generation,
)

ANTHROPIC_SAMPLING_CUTOFF = "2026-10-21"  # anthropic-version from which temperature/top_p/top_k are refused
# --- Anthropic -----------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "api_error", 504: "timeout_error",
                529: "overloaded_error"}
_ERROR_MESSAGES = {429: "Number of request tokens has exceeded your per-minute rate limit",
                   500: "Internal server error", 529: "Overloaded", 401: "invalid x-api-key",
                   503: "Service unavailable"}
_STOP_REASONS = {"end": "end_turn", "length": "max_tokens", "stop": "stop_sequence"}


def _text_of(content: Any) -> str:
    """A message's content (a string or a list of blocks) as text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise ValueError("content must be a string or a list of content blocks")


class AnthropicHandler(LoopbackHandler):
    """``POST /v1/messages`` as the Anthropic API answers it."""

    def error(self, status: int, message: str = "", request_id: str | None = None,
              retry_after: float | None = None) -> None:
        request_id = request_id or new_id("req_")
        error_type = _ERROR_TYPES.get(status, "api_error")
        headers = {"request-id": request_id}
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        if status in (401, 403):
            headers["x-should-retry"] = "false"
        text = message or _ERROR_MESSAGES.get(status, error_type)
        body = {"type": "error", "error": {"type": error_type, "message": text}, "request_id": request_id}
        self.send_json(status, body, headers)

    def _key(self) -> tuple[str | None, str | None]:
        if key := self.headers.get("x-api-key"):
            return key, "x-api-key"
        authorization = self.headers.get("authorization") or ""
        if authorization.lower().startswith("bearer "):
            return authorization[7:].strip(), "bearer"
        return None, None

    def do_GET(self) -> None:
        self.read_body()
        self.error(404, f"Not found: {self.path}")

    def do_POST(self) -> None:
        raw = self.read_body()
        request_id = new_id("req_")
        key, auth = self._key()
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = None
        self.record(payload, auth)
        if self.path.split("?")[0] != "/v1/messages":
            return self.error(404, f"Not found: {self.path}", request_id)
        version = self.headers.get("anthropic-version")
        if not version:
            return self.error(400, "anthropic-version: header is required", request_id)
        if not key:
            return self.error(401, "x-api-key header is required", request_id)
        if self.state.api_key is not None and key != self.state.api_key:
            return self.error(401, "invalid x-api-key", request_id)
        fault = self.state.faults.pop()
        if fault is not None and fault.kind == "status":
            return self.error(fault.status, fault.message, request_id, fault.retry_after)
        if fault is not None and fault.kind == "delay":
            return self.delay_then_hang_up(fault.seconds)
        problem = self._invalid(payload, version)
        if problem:
            return self.error(400, problem, request_id)
        assert isinstance(payload, dict)
        messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in payload["messages"]]
        if payload.get("system"):
            messages.insert(0, {"role": "system", "content": _text_of(payload["system"])})
        prompt = self.state.backing.chat_prompt(messages)
        stops = list(payload.get("stop_sequences") or [])
        stream = bool(payload.get("stream"))
        if fault is not None and fault.kind == "malformed":
            return self._malformed(stream, request_id)
        generation = start_generation(self.state.backing, prompt, max_tokens=int(payload["max_tokens"]), stops=stops)
        message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": payload["model"],
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": generation.prompt_tokens, "output_tokens": 0}}
        headers = {"request-id": request_id}
        if not stream:
            text = "".join(generation.pieces())
            message["content"] = [{"type": "text", "text": text}]
            message["stop_reason"] = _STOP_REASONS[generation.reason]
            message["stop_sequence"] = generation.stop
            message["usage"]["output_tokens"] = generation.output_tokens
            if fault is not None and fault.kind == "drop":
                data = json.dumps(message).encode()
                self.send_raw(200, data[: len(data) // 2], "application/json", headers, declared_length=len(data))
                return self.hang_up()
            return self.send_json(200, message, headers)
        self._stream(message, generation, headers, fault)

    def _invalid(self, payload: Any, version: str) -> str | None:
        """The 400 message for a request the API would refuse, or None."""
        if not isinstance(payload, dict):
            return "request body must be a JSON object"
        for name in ("model", "max_tokens", "messages"):
            if name not in payload:
                return f"{name}: Field required"
        if not isinstance(payload["max_tokens"], int) or payload["max_tokens"] < 1:
            return "max_tokens: must be a positive integer"
        messages = payload["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        try:
            for m in messages:
                if m.get("role") not in ("user", "assistant"):
                    return "messages: roles must be user or assistant"
                if not _text_of(m.get("content")).strip():
                    return "messages: text content blocks must be non-empty"
        except (ValueError, AttributeError) as exc:
            return f"messages: {exc}"
        stops = payload.get("stop_sequences") or []
        if not isinstance(stops, list) or any(not isinstance(s, str) or not s.strip() for s in stops):
            return "stop_sequences: each stop sequence must contain non-whitespace"
        if version >= ANTHROPIC_SAMPLING_CUTOFF:
            for name in ("temperature", "top_p", "top_k"):
                if name in payload:
                    return f"{name}: Extra inputs are not permitted"
        return None

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.write_event(data, event=name)

    def _malformed(self, stream: bool, request_id: str) -> None:
        headers = {"request-id": request_id}
        if not stream:
            return self.send_raw(200, b'{"id": "msg_broken", "type": "message", "content": [{"type": ',
                                 "application/json", headers)
        self.start_stream(headers)
        self.write_chunk(b'event: message_start\ndata: {"type": "message_start", "message": {"id": \n\n')
        self.end_stream()

    def _stream(self, message: dict[str, Any], generation: Generation, headers: dict[str, str],
                fault: Fault | None) -> None:
        self.start_stream(headers)
        start = dict(message, usage={"input_tokens": generation.prompt_tokens, "output_tokens": 1})
        self._event("message_start", {"type": "message_start", "message": start})
        self._event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        self._event("ping", {"type": "ping"})
        sent = 0
        pieces = generation.pieces()
        try:
            for piece in pieces:
                self._event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": piece}})
                sent += 1
                if fault is not None and fault.kind in ("drop", "stream_error") and sent >= fault.after_pieces:
                    break
        finally:
            pieces.close()
        if fault is not None and fault.kind == "drop":
            return self.hang_up()
        if fault is not None and fault.kind == "stream_error":
            error_type = _ERROR_TYPES.get(fault.status, "api_error")
            text = fault.message or _ERROR_MESSAGES.get(fault.status, error_type)
            self._event("error", {"type": "error", "error": {"type": error_type, "message": text}})
            return self.end_stream()
        self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
        self._event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": _STOP_REASONS[generation.reason],
                                                "stop_sequence": generation.stop},
                                      "usage": {"output_tokens": generation.output_tokens}})
        self._event("message_stop", {"type": "message_stop"})
        self.end_stream()


@contextlib.contextmanager
def running_anthropic_server(model_path: Path | None = None, *, api_key: str | None = None,
                             backing: BackingModel | None = None, n_ctx: int = 2048) -> Iterator[LoopbackServer]:
    """An Anthropic Messages API on ``http://127.0.0.1:<free port>`` (point ANTHROPIC_BASE_URL at ``base_url``).

    ``api_key``: the only key accepted (None: any non-empty key). ``backing``: share an already loaded model.
    """
    yield from serve_api(AnthropicHandler, model_path=model_path, api_key=api_key, backing=backing, n_ctx=n_ctx)
