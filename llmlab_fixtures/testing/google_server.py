"""A loopback stand-in for the Gemini API (generateContent / streamGenerateContent), backed by a real local model.

``POST /{v1|v1beta}/models/{model}:generateContent`` answers one ``GenerateContentResponse``;
``:streamGenerateContent?alt=sse`` streams them as ``data: {...}`` events (without ``alt=sse``: one JSON array).
Each response has ``candidates[{content{parts[{text}], role: model}, finishReason, index}]``,
``usageMetadata{promptTokenCount, candidatesTokenCount, totalTokenCount}``, ``modelVersion`` and ``responseId``.
The key comes in ``x-goog-api-key`` or ``?key=``; as the real API does, a missing key is 403 PERMISSION_DENIED and a
wrong one 400 INVALID_ARGUMENT with reason API_KEY_INVALID. Errors are ``{"error": {code, message, status,
details}}``; a 429 carries a ``google.rpc.RetryInfo`` detail with ``retryDelay``. At most 5 stop sequences, as
the API allows. google-genai 3.6.1 calls ``/v1`` by default; both versions are served. Decoding is greedy.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llmlab_fixtures.testing.backing_model import BackingModel
from llmlab_fixtures.testing.loopback import (
    Fault,
    FaultQueue,
    Generation,
    LoopbackHandler,
    LoopbackServer,
    new_id,
    serve_api,
    start_generation,
)

__all__ = ["Fault", "FaultQueue", "GoogleHandler", "LoopbackServer", "running_google_server"]

MAX_STOP_SEQUENCES = 5
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 502: "UNAVAILABLE",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_MESSAGES = {429: "Resource has been exhausted (e.g. check quota).",
             500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
             503: "The model is overloaded. Please try again later.",
             401: "Request had invalid authentication credentials.",
             504: "Deadline expired before operation could complete."}
_FINISH = {"end": "STOP", "stop": "STOP", "length": "MAX_TOKENS"}
_ROLES = {"user": "user", "model": "assistant"}


class GoogleHandler(LoopbackHandler):
    """The Gemini API's generateContent and streamGenerateContent methods."""

    def error(self, status: int, message: str = "", *, retry_after: float | None = None,
              details: list[dict[str, Any]] | None = None) -> None:
        body: dict[str, Any] = {"code": status, "message": message or _MESSAGES.get(status, "error"),
                                "status": _STATUS_NAMES.get(status, "UNKNOWN")}
        details = list(details or [])
        if retry_after is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"})
        if details:
            body["details"] = details
        self.send_json(status, {"error": body})

    def do_GET(self) -> None:
        self.read_body()
        self.error(404, f"Method not found: {self.path}")

    def do_POST(self) -> None:
        raw = self.read_body()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        key = self.headers.get("x-goog-api-key")
        auth = "x-goog-api-key" if key else None
        if not key and query.get("key"):
            key, auth = query["key"][0], "query"
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            payload = None
        self.record(payload, auth)
        parts = url.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] not in ("v1", "v1beta") or parts[1] != "models" or ":" not in parts[2]:
            return self.error(404, f"Method not found: {url.path}")
        model, method = parts[2].rsplit(":", 1)
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error(404, f"Method not found: {method}")
        if not key:
            return self.error(403, "Method doesn't allow unregistered callers (callers without established "
                                   "identity). Please use API Key or other form of API consumer identity to call "
                                   "this API.")
        if self.state.api_key is not None and key != self.state.api_key:
            return self.error(400, "API key not valid. Please pass a valid API key.", details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
        fault = self.state.faults.pop()
        if fault is not None and fault.kind == "status":
            return self.error(fault.status, fault.message, retry_after=fault.retry_after)
        if fault is not None and fault.kind == "delay":
            return self.delay_then_hang_up(fault.seconds)
        try:
            messages, config = self._parse(payload)
        except ValueError as exc:
            return self.error(400, str(exc))
        sse = method == "streamGenerateContent" and query.get("alt", [""])[0] == "sse"
        if fault is not None and fault.kind == "malformed":
            return self._malformed(sse)
        prompt = self.state.backing.chat_prompt(messages)
        generation = start_generation(self.state.backing, prompt, max_tokens=config["max_tokens"],
                                      stops=config["stops"], seed=config["seed"])
        response_id = new_id("")
        if method == "generateContent":
            text = "".join(generation.pieces())
            return self.send_json(200, self._response(model, response_id, generation, text, final=True))
        if not sse:
            chunks = [self._response(model, response_id, generation, p, final=False) for p in generation.pieces()]
            chunks.append(self._response(model, response_id, generation, "", final=True))
            return self.send_json(200, chunks)
        self._stream(model, response_id, generation, fault)

    def _parse(self, payload: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """Chat messages and generation settings from a GenerateContentRequest (ValueError: a 400)."""
        if not isinstance(payload, dict):
            raise ValueError("Invalid JSON payload received.")
        contents = payload.get("contents")
        if not isinstance(contents, list) or not contents:
            raise ValueError("* GenerateContentRequest.contents: contents is not specified")
        messages: list[dict[str, str]] = []
        system = payload.get("systemInstruction") or payload.get("system_instruction")
        if system:
            messages.append({"role": "system", "content": "".join(p.get("text", "") for p in system.get("parts", []))})
        for content in contents:
            role = _ROLES.get(content.get("role") or "user")
            if role is None:
                raise ValueError(f"Please use a valid role: user, model. Got {content.get('role')!r}")
            text = "".join(p.get("text", "") for p in content.get("parts", []) if isinstance(p, dict))
            if not text:
                raise ValueError("* GenerateContentRequest.contents.parts: contents.parts must not be empty.")
            messages.append({"role": role, "content": text})
        generation = payload.get("generationConfig") or {}
        stops = generation.get("stopSequences") or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"* GenerateContentRequest.generation_config.stop_sequences: at most "
                             f"{MAX_STOP_SEQUENCES} stop sequences are allowed")
        max_tokens = int(generation.get("maxOutputTokens") or 8192)
        if max_tokens < 1:
            raise ValueError("* GenerateContentRequest.generation_config.max_output_tokens: must be positive")
        return messages, {"stops": list(stops), "max_tokens": max_tokens, "seed": generation.get("seed")}

    @staticmethod
    def _response(model: str, response_id: str, generation: Generation, text: str, *, final: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        usage: dict[str, Any] = {"promptTokenCount": generation.prompt_tokens,
                                 "totalTokenCount": generation.prompt_tokens}
        if final:
            candidate["finishReason"] = _FINISH[generation.reason]
            usage["candidatesTokenCount"] = generation.output_tokens
            usage["totalTokenCount"] = generation.prompt_tokens + generation.output_tokens
            usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": generation.prompt_tokens}]
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": response_id}

    def _data(self, payload: dict[str, Any]) -> None:
        self.write_event(payload, newline="\r\n")

    def _malformed(self, sse: bool) -> None:
        if not sse:
            return self.send_raw(200, b'{"candidates": [{"content": {"parts": [{"text": ', "application/json")
        self.start_stream()
        self.write_chunk(b'data: {"candidates": [{"content": {"parts": [{"text": "A\r\n\r\n')
        self.end_stream()

    def _stream(self, model: str, response_id: str, generation: Generation, fault: Fault | None) -> None:
        self.start_stream()
        sent = 0
        pieces = generation.pieces()
        try:
            for piece in pieces:
                self._data(self._response(model, response_id, generation, piece, final=False))
                sent += 1
                if fault is not None and fault.kind in ("drop", "stream_error") and sent >= fault.after_pieces:
                    break
        finally:
            pieces.close()
        if fault is not None and fault.kind == "drop":
            return self.hang_up()
        if fault is not None and fault.kind == "stream_error":
            text = fault.message or _MESSAGES.get(fault.status, "error")
            self._data({"error": {"code": fault.status, "message": text,
                                  "status": _STATUS_NAMES.get(fault.status, "UNKNOWN")}})
            return self.end_stream()
        self._data(self._response(model, response_id, generation, "", final=True))
        self.end_stream()


@contextlib.contextmanager
def running_google_server(model_path: Path | None = None, *, api_key: str | None = None,
                          backing: BackingModel | None = None, n_ctx: int = 2048) -> Iterator[LoopbackServer]:
    """A Gemini API on ``http://127.0.0.1:<free port>`` (point GOOGLE_GEMINI_BASE_URL at ``base_url``).

    ``api_key``: the only key accepted (None: any non-empty key). ``backing``: share an already loaded model.
    """
    yield from serve_api(GoogleHandler, model_path=model_path, api_key=api_key, backing=backing, n_ctx=n_ctx)
