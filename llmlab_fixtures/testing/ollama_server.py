"""A loopback server speaking Ollama's REST API, serving real GGUF models through llama-cpp-python.

It answers the official ``ollama`` Python client (and curl) the way an Ollama server does: ``/api/generate`` and
``/api/chat`` (NDJSON streams or one JSON object), ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull``,
``/api/version`` and ``/``; and, as Ollama does, OpenAI's wire format under ``/v1`` (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``) for the ``openai`` SDK: JSON or SSE streams, usage from llama.cpp's own
counters (in a final chunk when ``stream_options.include_usage`` is set). Models load on first use and unload when
their ``keep_alive`` runs out. Requests to one model are served one at a time. The HTTP side (the threaded server,
request bodies, JSON, NDJSON and SSE replies, connection drops) is ``loopback``'s, as for the other stand-ins.
Start it by hand with::

    python -m llmlab_fixtures.testing.ollama_server [--port 11434] [--model TAG=PATH ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TextIO

from llmlab_fixtures.providers.ollama import normalize_tag
from llmlab_fixtures.run.cores import available_cores
from llmlab_fixtures.testing.backing_model import BackingModel
from llmlab_fixtures.testing.loopback import LoopbackHandler, LoopbackHTTPServer

VERSION = "0.0.0"  # what a development build of Ollama reports
DEFAULT_PORT = 11434
DEFAULT_NUM_CTX = 4096
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default "5m" (or $OLLAMA_KEEP_ALIVE)
DEFAULT_TEMPERATURE = 0.8  # Ollama's default sampling temperature
OPENAI_DEFAULT_TEMPERATURE = 1.0  # what Ollama's /v1 sets when a request names no temperature (OpenAI's default)
FOREVER_S = 290 * 365.25 * 86400.0  # a negative keep_alive keeps the model loaded (Go's max duration, ~292 years)
_HASH_BLOCK = 8 << 20

# Types of the options Ollama's api.Options accepts (unknown options are ignored, as Ollama does).
_INT_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                          "num_predict", "top_k", "repeat_last_n", "mirostat"})
_FLOAT_OPTIONS = frozenset({"temperature", "top_p", "min_p", "typical_p", "tfs_z", "repeat_penalty",
                            "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"})
_BOOL_OPTIONS = frozenset({"numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
                           "embedding_only", "penalize_newline"})

# Request fields and their JSON types, for Go-style "cannot unmarshal" messages.
_REQUEST_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "GenerateRequest": {"model": (str,), "prompt": (str,), "suffix": (str,), "system": (str,), "template": (str,),
                        "raw": (bool,), "stream": (bool,), "options": (dict,), "context": (list,),
                        "images": (list,), "format": (str, dict), "think": (bool, str)},
    "ChatRequest": {"model": (str,), "messages": (list,), "stream": (bool,), "options": (dict,), "tools": (list,),
                    "format": (str, dict), "think": (bool, str)},
    "ShowRequest": {"model": (str,), "name": (str,), "verbose": (bool,), "system": (str,)},
    "PullRequest": {"model": (str,), "name": (str,), "stream": (bool,), "insecure": (bool,)},
    # OpenAI's bodies as Ollama's /v1 reads them ("stop" is any JSON value there; see _openai_options)
    "CompletionRequest": {"model": (str,), "prompt": (str,), "suffix": (str,), "stream": (bool,),
                          "stream_options": (dict,), "max_tokens": (int,), "temperature": (float, int),
                          "top_p": (float, int), "seed": (int,), "frequency_penalty": (float, int),
                          "presence_penalty": (float, int)},
    "ChatCompletionRequest": {"model": (str,), "messages": (list,), "stream": (bool,), "stream_options": (dict,),
                              "max_tokens": (int,), "temperature": (float, int), "top_p": (float, int),
                              "seed": (int,), "frequency_penalty": (float, int), "presence_penalty": (float, int),
                              "tools": (list,), "response_format": (dict,)},
}
_OPENAI_REQUESTS = frozenset({"CompletionRequest", "ChatCompletionRequest"})  # Go package openai, not api
_JSON_TYPE_NAMES = {str: "string", bool: "bool", dict: "object", list: "array", int: "number", float: "number"}
_GO_TYPE_NAMES = {str: "string", bool: "bool", dict: "map[string]interface {}", list: "[]interface {}",
                  int: "int", float: "float64"}


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status, the way Ollama answers errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- small helpers ---------------------------------------------------------------------------------------------


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"5m"``, ``"1h30m"``, ``"300ms"``, ``"0"``); ValueError like Go's."""
    original, rest, sign = text, text, 1.0
    if rest[:1] in "+-" and rest:
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {json.dumps(original)}")
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            unit_missing = re.fullmatch(r"[\d.]+", rest[pos:]) is not None
            reason = "missing unit in duration" if unit_missing else "invalid duration"
            raise ValueError(f"time: {reason} {json.dumps(original)}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def parse_keep_alive(value: Any, default: float) -> float:
    """Seconds a model stays loaded after a request: a number is seconds, a string a Go duration; negative = forever."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise ApiError(400, "json: cannot unmarshal bool into Go struct field .keep_alive of type api.Duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
    else:
        raise ApiError(400, f"json: cannot unmarshal {_json_type(value)} into Go struct field .keep_alive "
                            "of type api.Duration")
    return FOREVER_S if seconds < 0 else seconds


def human_number(n: int) -> str:
    """Ollama's parameter_size format: 134515008 → ``134.52M``, 8030261248 → ``8.0B``."""
    for scale, suffix, digits in ((1e9, "B", 1), (1e6, "M", 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{suffix}" if value == math.floor(value) else f"{value:.{digits}f}{suffix}"
    return f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)


def _rfc3339(epoch: float, *, local: bool = False) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    if local:
        return moment.astimezone().isoformat()
    return moment.isoformat().replace("+00:00", "Z")


def _now_utc() -> str:
    return _rfc3339(time.time())


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in _JSON_TYPE_NAMES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGEST_LOCK = threading.Lock()


def file_digest(path: Path) -> str:
    """sha256 of a model file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while block := handle.read(_HASH_BLOCK):
                    digest.update(block)
            _DIGESTS[key] = digest.hexdigest()
        return _DIGESTS[key]


def _perf_data(model: BackingModel) -> Any | None:
    """llama.cpp's own prompt/eval counters for the model's context (None if this llama-cpp-python lacks them)."""
    try:
        import llama_cpp

        return llama_cpp.llama_perf_context(model.llm._ctx.ctx)
    except Exception:
        return None


def _perf_reset(model: BackingModel) -> None:
    with contextlib.suppress(Exception):
        import llama_cpp

        llama_cpp.llama_perf_context_reset(model.llm._ctx.ctx)


# --- models ------------------------------------------------------------------------------------------------------


@dataclass
class ModelSlot:
    """One registered tag: its GGUF, and the loaded model while it is in memory."""

    tag: str
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time per model
    model: BackingModel | None = None
    n_ctx: int = 0
    n_threads: int | None = None
    expires_at: float = 0.0  # epoch seconds
    _header: dict[str, Any] | None = None

    @property
    def header(self) -> dict[str, Any]:
        """The parsed GGUF header (key/values and tensor table; no weights are read)."""
        if self._header is None:
            from llmlab_fixtures.models.gguf import check_gguf_file

            self._header = check_gguf_file(self.path)
        return self._header

    @property
    def architecture(self) -> str:
        return str(self.header["kv"].get("general.architecture") or "")

    @property
    def parameter_count(self) -> int:
        kv = self.header["kv"]
        return int(kv.get("general.parameter_count") or self.header["tensor_elements"] or 0)

    def details(self) -> dict[str, Any]:
        from llmlab_fixtures.models.gguf import gguf_metadata

        meta = gguf_metadata(self.path)
        arch = self.architecture
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
                "parameter_size": human_number(self.parameter_count), "quantization_level": meta["quantization"] or ""}

    def model_info(self) -> dict[str, Any]:
        """GGUF key/values as Ollama's ``model_info``: long arrays emptied, name and chat template left out."""
        header = self.header
        info: dict[str, Any] = {}
        for key, value in header["kv"].items():
            if key in ("general.name", "tokenizer.chat_template"):
                continue
            info[key] = [] if isinstance(value, list) and len(value) > 5 else value
        for key in header["array_lengths"]:
            info.setdefault(key, [])
        info["general.parameter_count"] = self.parameter_count
        return dict(sorted(info.items()))

    def memory_size(self) -> int:
        """Bytes the loaded model takes: the file plus an f16 KV cache of ``n_ctx`` positions."""
        from llmlab_fixtures.models.gguf import gguf_metadata

        meta = gguf_metadata(self.path)
        n_layer = int(meta.get("block_count") or 0)
        heads_kv = meta.get("head_count_kv") or 0
        per_layer = heads_kv if isinstance(heads_kv, list) else [heads_kv] * n_layer
        kv_dims = int(meta.get("key_length") or 0) + int(meta.get("value_length") or 0)
        return int(meta["file_size"]) + (self.n_ctx or DEFAULT_NUM_CTX) * sum(int(h) * kv_dims for h in per_layer) * 2


# --- the HTTP side -----------------------------------------------------------------------------------------------


class _Reply:
    """One response: a JSON object, or an NDJSON stream (chunked, headers with the first line); errors mid-stream
    become a line."""

    content_type = "application/x-ndjson"

    def __init__(self, handler: _Handler, *, stream: bool) -> None:
        self.handler = handler
        self.stream = stream
        self.started = False
        self.chunks = 0

    def json(self, status: int, body: Any) -> None:
        self.handler.send_json(status, body)
        self.started = True

    def open(self) -> None:
        """Start the stream (its headers go out before the first chunk)."""
        if not self.started:
            self.handler.start_stream(content_type=self.content_type)
            self.started = True

    def line(self, body: Any) -> None:
        """Send one streamed object."""
        self.open()
        self.handler.write_ndjson(body)
        self.chunks += 1

    def end(self) -> None:
        if self.stream and self.started:
            self.handler.end_stream()

    def error(self, status: int, message: str) -> None:
        """Ollama's error reply: a status with ``{"error"}`` before any output, an ``{"error"}`` line after."""
        if self.started and self.stream:
            self.line({"error": message})
            self.end()
        elif not self.started:
            self.json(status, {"error": message})


_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def openai_usage(body: Mapping[str, Any]) -> dict[str, int]:
    """OpenAI's ``usage`` from an Ollama final object: the prompt and generated tokens llama.cpp evaluated."""
    prompt, completion = int(body.get("prompt_eval_count") or 0), int(body.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_error(status: int, message: str) -> dict[str, Any]:
    """An OpenAI-style error body, typed by status the way Ollama's /v1 types them."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _OpenAIReply(_Reply):
    """Ollama's /v1 layer: the objects /api/generate and /api/chat answer, written in OpenAI's wire format.

    One JSON completion (``text_completion`` / ``chat.completion`` with ``usage``), or an SSE stream of chunks, a
    chunk with empty ``choices`` and the ``usage`` when ``stream_options.include_usage`` is set, then ``[DONE]``.
    Like Ollama, streamed text completions carry a zero ``usage`` on every chunk while usage is asked for.
    """

    content_type = "text/event-stream"

    def __init__(self, handler: _Handler, *, stream: bool) -> None:
        super().__init__(handler, stream=stream)
        self.chat = False
        self.openai_stream = False
        self.include_usage = False
        self.forwarded = False  # the body is now an /api request: its errors pass on as API errors, status kept
        self.id = ""

    def forward(self, *, chat: bool, stream: bool, include_usage: bool) -> None:
        self.chat, self.openai_stream, self.include_usage, self.forwarded = chat, stream, include_usage, True
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{random.randrange(999)}"

    def _head(self, body: Mapping[str, Any], streamed: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": body.get("model", ""),
                "system_fingerprint": "fp_ollama"}

    def _choice(self, body: Mapping[str, Any], streamed: bool) -> dict[str, Any]:
        finish = body.get("done_reason") or None
        if not self.chat:
            return {"text": body.get("response", ""), "index": 0, "finish_reason": finish}
        message = {"role": "assistant", "content": (body.get("message") or {}).get("content", "")}
        return {"index": 0, "delta" if streamed else "message": message, "finish_reason": finish}

    def event(self, body: Any) -> None:
        self.open()
        self.handler.write_event(body)

    def json(self, status: int, body: Any) -> None:
        if not self.forwarded or status != 200:
            super().json(status, body)
        elif self.openai_stream:  # an answer /api gives as one object (a load) still streams here
            self.stream = True
            self.line(body)
            self.end()
        else:
            super().json(200, {**self._head(body, False), "choices": [self._choice(body, False)],
                               "usage": openai_usage(body)})

    def line(self, body: Any) -> None:
        chunk = {**self._head(body, True), "choices": [self._choice(body, True)]}
        if self.include_usage and not self.chat:
            chunk["usage"] = _ZERO_USAGE
        self.event(chunk)
        if body.get("done") and self.include_usage:
            self.event({**self._head(body, True), "choices": [], "usage": openai_usage(body)})
        self.chunks += 1

    def end(self) -> None:
        if self.stream and self.started:
            self.event("[DONE]")
        super().end()

    def error(self, status: int, message: str) -> None:
        """Before any output: the status with an error body; mid-stream: an error event and no ``[DONE]``."""
        body = openai_error(500 if self.forwarded else status, message)
        if self.started and self.stream:
            self.event(body)
            _Reply.end(self)
        elif not self.started:
            super().json(status, body)


_GET_ROUTES = {"/": "root", "/api/tags": "tags", "/api/ps": "ps", "/api/version": "version",
               "/v1/models": "openai_models"}
_HEAD_ROUTES = {"/": "root", "/api/tags": "tags", "/api/version": "version"}
_POST_ROUTES = {"/api/generate": "generate", "/api/chat": "chat", "/api/show": "show", "/api/pull": "pull",
                "/v1/completions": "openai_completions", "/v1/chat/completions": "openai_chat"}


class _Handler(LoopbackHandler):
    """Ollama's routes on the loopback handler: JSON as Go's encoder writes it, NDJSON (``/api``) or SSE (``/v1``)."""

    server_version = "llmlab-ollama-loopback"
    sys_version = ""
    json_content_type = "application/json; charset=utf-8"
    json_ensure_ascii = False
    stream_headers: ClassVar[dict[str, str]] = {}

    @property
    def app(self) -> OllamaServer:
        return self.server.state  # type: ignore[no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        self.app.log(f"{self.address_string()} {format % args}")

    # routing

    def do_GET(self) -> None:
        self._dispatch(_GET_ROUTES)

    def do_HEAD(self) -> None:
        self._dispatch(_HEAD_ROUTES)

    def do_POST(self) -> None:
        self._dispatch(_POST_ROUTES)

    def do_DELETE(self) -> None:
        self._dispatch({})

    def _dispatch(self, routes: Mapping[str, str]) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        body = self.read_body()
        name = routes.get(path)
        if name is None:
            known = path in _GET_ROUTES or path in _POST_ROUTES
            status, text = (405, "405 method not allowed") if known else (404, "404 page not found")
            self.send_text(status, text)
            return
        reply = (_OpenAIReply if path.startswith("/v1/") else _Reply)(self, stream=False)
        try:
            getattr(self.app, f"api_{name}")(self, body, reply)
        except ApiError as exc:
            self._fail(reply, exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug or a llama.cpp failure: Ollama answers 500 with the message
            self._fail(reply, 500, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))

    def _fail(self, reply: _Reply, status: int, message: str) -> None:
        try:
            reply.error(status, message)
        except OSError:
            self.close_connection = True


# --- the server --------------------------------------------------------------------------------------------------


def _parse_request(body: bytes, kind: str) -> dict[str, Any]:
    """Decode a request body and check field types; ApiError(400) with Ollama/Go-style messages."""
    if not body.strip():
        raise ApiError(400, "missing request body")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        package = "openai" if kind in _OPENAI_REQUESTS else "api"
        raise ApiError(400, f"json: cannot unmarshal {_json_type(data)} into Go value of type {package}.{kind}")
    for key, types in _REQUEST_FIELDS[kind].items():
        value = data.get(key)
        if value is None:
            data.pop(key, None)  # JSON null is the zero value in Go
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ApiError(400, f"json: cannot unmarshal {_json_type(value)} into Go struct field "
                                f"{kind}.{key} of type {_GO_TYPE_NAMES[types[0]]}")
    return data


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options with Ollama's type rules: integers may arrive as JSON floats; stop is a list of strings."""
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(400, f"option {json.dumps(key)} must be of type integer")
            checked[key] = int(value)
        elif key in _FLOAT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ApiError(400, f"option {json.dumps(key)} must be of type float32")
            checked[key] = float(value)
        elif key in _BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise ApiError(400, f"option {json.dumps(key)} must be of type boolean")
            checked[key] = value
        elif key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ApiError(400, 'option "stop" must be of type array')
            if not all(isinstance(s, str) for s in value):
                raise ApiError(400, 'option "stop" must be of an array of strings')
            checked[key] = [s for s in value if s]
        # unknown options: Ollama logs "invalid option provided" and goes on
    return checked


def _go_value_type(value: Any) -> str:
    """Go's ``%T`` of a decoded JSON value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "float64"
    return _GO_TYPE_NAMES.get(type(value), "<nil>")


def _openai_options(request: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama options from an OpenAI body: max_tokens → num_predict, temperature (default 1), seed, stop, top_p."""
    options: dict[str, Any] = {"temperature": request.get("temperature", OPENAI_DEFAULT_TEMPERATURE),
                               "top_p": request.get("top_p") or 1.0}
    if "max_tokens" in request:
        options["num_predict"] = request["max_tokens"]
    for key in ("seed", "frequency_penalty", "presence_penalty"):
        if key in request:
            options[key] = request[key]
    stop = request.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        for value in stop:
            if not isinstance(value, str):
                raise ApiError(400, f"invalid type for 'stop' field: {_go_value_type(value)}")
        options["stop"] = stop
    return options  # any other "stop" is ignored, as Ollama's decoder does


def _include_usage(request: Mapping[str, Any]) -> bool:
    value = (request.get("stream_options") or {}).get("include_usage", False)
    if not isinstance(value, bool):
        raise ApiError(400, f"json: cannot unmarshal {_json_type(value)} into Go struct field "
                            "StreamOptions.stream_options.include_usage of type bool")
    return value


def _openai_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama's: text parts become messages of their own, image parts messages with an image."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, f"json: cannot unmarshal {_json_type(message)} into Go struct field "
                                "ChatCompletionRequest.messages of type openai.Message")
        role, content = message.get("role", ""), message.get("content")
        if isinstance(content, str):
            converted.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    converted.append({"role": role, "content": part["text"]})
                elif kind == "image_url":
                    converted.append({"role": role, "content": "", "images": [part.get("image_url")]})
                else:
                    raise ApiError(400, "invalid message format")
        else:
            raise ApiError(400, f"invalid message content type: {_go_value_type(content)}")
    return converted


@dataclass
class _Faults:
    """Failures a test can inject into the next generation on this server."""

    fail_message: str | None = None  # the next generation raises this (HTTP 500)
    drop_after: int | None = None  # the next stream is cut after this many chunks


class OllamaServer:
    """An Ollama-compatible HTTP server on 127.0.0.1 serving ``models`` (tag → GGUF path) with llama-cpp-python."""

    def __init__(self, models: Mapping[str, str | Path] | None = None, *, port: int = 0,
                 keep_alive: float | None = None, num_ctx: int = DEFAULT_NUM_CTX, num_thread: int | None = None,
                 log: TextIO | None = None) -> None:
        models = default_models() if models is None else models
        self.slots: dict[str, ModelSlot] = {}
        for tag, path in models.items():
            display = tag.strip()
            if ":" not in display.rsplit("/", 1)[-1]:
                display += ":latest"  # Ollama never hides the tag in listings
            self.slots[normalize_tag(tag)] = ModelSlot(tag=display, path=Path(path))
        if keep_alive is None:
            env = os.environ.get("OLLAMA_KEEP_ALIVE")
            keep_alive = parse_keep_alive(env, DEFAULT_KEEP_ALIVE_S) if env else DEFAULT_KEEP_ALIVE_S
        self.keep_alive = keep_alive
        self.num_ctx = num_ctx
        self.num_thread = num_thread or available_cores()
        self.port = port
        self.faults = _Faults()
        self._log = log
        self._log_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self.peak_in_flight = 0  # the most generate/chat requests open at once (waiting for a slot included)
        self._http: LoopbackHTTPServer | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()

    # lifecycle

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (what OLLAMA_HOST should be set to)."""
        if self._http is None:
            raise RuntimeError("the server is not running; call start()")
        return self._http.url

    def start(self) -> OllamaServer:
        """Bind 127.0.0.1:port (0 = a free port) and serve in background threads."""
        if self._http is not None:
            return self
        self._stopping.clear()
        self._http = LoopbackHTTPServer(("127.0.0.1", self.port), _Handler, state=self)
        self._http.start(poll_interval=0.2, name="ollama-loopback")
        self._reaper = threading.Thread(target=self._reap, name="ollama-loopback-keepalive", daemon=True)
        self._reaper.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests, cut open connections and unload every model."""
        http, self._http = self._http, None
        if http is None:
            return
        self._stopping.set()
        http.stop(cut_connections=True)  # pooled keep-alive connections too, like a server process that exits
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        for slot in self.slots.values():
            if slot.lock.acquire(timeout=30):  # never free a model a request thread is still using
                try:
                    self._unload(slot)
                finally:
                    slot.lock.release()

    def __enter__(self) -> OllamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Start and block until SIGINT/SIGTERM (the command-line entry point)."""
        self.start()
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        try:
            while not done.wait(0.5):
                pass
        finally:
            self.stop()

    # fault injection (tests)

    def fail_next_generation(self, message: str = "injected failure") -> None:
        """Make the next generate/chat request fail inside generation (answered as HTTP 500)."""
        self.faults.fail_message = message

    def drop_next_stream(self, after_chunks: int = 1) -> None:
        """Cut the connection of the next streamed generation after ``after_chunks`` chunks."""
        self.faults.drop_after = after_chunks

    # models

    def log(self, line: str) -> None:
        if self._log is not None:
            with self._log_lock:
                print(f"[ollama-loopback] {time.strftime('%Y/%m/%d %H:%M:%S')} {line}", file=self._log, flush=True)

    def loaded_tags(self) -> list[str]:
        """Tags whose model is in memory now."""
        return [slot.tag for slot in self.slots.values() if slot.model is not None]

    def slot(self, name: str, *, pull_hint: bool = True) -> ModelSlot:
        slot = self.slots.get(normalize_tag(name))
        if slot is None:
            message = f"model {json.dumps(name)} not found, try pulling it first" if pull_hint \
                else f"model '{name}' not found"
            raise ApiError(404, message)
        return slot

    def _load(self, slot: ModelSlot, options: Mapping[str, Any]) -> float:
        """Load the slot's model (or reload it when num_ctx/num_thread differ); seconds spent loading."""
        n_ctx = int(options.get("num_ctx") or self.num_ctx)
        n_threads = int(options.get("num_thread") or self.num_thread)
        if slot.model is not None and (slot.n_ctx, slot.n_threads) == (n_ctx, n_threads):
            return 0.0
        self._unload(slot)
        started = time.perf_counter()
        slot.model = BackingModel(slot.path, n_ctx=n_ctx, n_threads=n_threads)
        slot.n_ctx, slot.n_threads = n_ctx, n_threads
        slot.expires_at = time.time() + self.keep_alive
        self.log(f"loaded {slot.tag} from {slot.path} (n_ctx={n_ctx}, n_threads={n_threads})")
        return time.perf_counter() - started

    def _unload(self, slot: ModelSlot) -> None:
        model, slot.model = slot.model, None
        if model is not None:
            with contextlib.suppress(Exception):
                model.llm.close()
            self.log(f"unloaded {slot.tag}")

    def _settle(self, slot: ModelSlot, keep_alive: float) -> None:
        """After a request: unload now (keep_alive 0) or keep the model until the keep_alive runs out."""
        if keep_alive <= 0:
            self._unload(slot)
        else:
            slot.expires_at = time.time() + keep_alive

    def _reap(self) -> None:
        while not self._stopping.wait(0.25):
            now = time.time()
            for slot in self.slots.values():
                if slot.model is not None and slot.expires_at <= now and slot.lock.acquire(blocking=False):
                    try:
                        if slot.model is not None and slot.expires_at <= time.time():
                            self._unload(slot)
                    finally:
                        slot.lock.release()

    # endpoints

    def api_root(self, handler: _Handler, _body: bytes, _reply: _Reply) -> None:
        handler.send_text(200, "Ollama is running")

    def api_version(self, _handler: _Handler, _body: bytes, reply: _Reply) -> None:
        reply.json(200, {"version": VERSION})

    def _listing(self, slot: ModelSlot) -> dict[str, Any]:
        st = slot.path.stat()
        return {"name": slot.tag, "model": slot.tag, "modified_at": _rfc3339(st.st_mtime, local=True),
                "size": st.st_size, "digest": file_digest(slot.path), "details": slot.details()}

    def api_tags(self, _handler: _Handler, _body: bytes, reply: _Reply) -> None:
        models = [self._listing(slot) for slot in self.slots.values() if slot.path.is_file()]
        models.sort(key=lambda m: m["modified_at"], reverse=True)
        reply.json(200, {"models": models})

    def api_ps(self, _handler: _Handler, _body: bytes, reply: _Reply) -> None:
        models = []
        for slot in self.slots.values():
            if slot.model is None:
                continue
            models.append({"name": slot.tag, "model": slot.tag, "size": slot.memory_size(),
                           "digest": file_digest(slot.path), "details": slot.details(),
                           "expires_at": _rfc3339(slot.expires_at, local=True),
                           "size_vram": 0, "context_length": slot.n_ctx})
        models.sort(key=lambda m: m["expires_at"], reverse=True)
        reply.json(200, {"models": models})

    def api_show(self, _handler: _Handler, body: bytes, reply: _Reply) -> None:
        request = _parse_request(body, "ShowRequest")
        name = request.get("model") or request.get("name")
        if not name:
            raise ApiError(400, "model is required")
        slot = self.slot(name, pull_hint=False)
        if not slot.path.is_file():
            raise ApiError(404, f"model '{name}' not found")
        kv = slot.header["kv"]
        template = str(kv.get("tokenizer.chat_template") or "")
        parameters = f"{'num_ctx':<30} {self.num_ctx}"
        modelfile = (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, replace FROM '
                     f"with:\n# FROM {slot.tag}\n\nFROM {slot.path}\n")
        if template:
            modelfile += f'TEMPLATE """{template}"""\n'
        modelfile += f"PARAMETER num_ctx {self.num_ctx}\n"
        if request.get("system"):
            modelfile += f'SYSTEM """{request["system"]}"""\n'
        reply.json(200, {
            "modelfile": modelfile,
            "parameters": parameters,
            "template": template,
            "details": slot.details(),
            "model_info": slot.model_info(),
            "capabilities": ["completion"],
            "modified_at": _rfc3339(slot.path.stat().st_mtime, local=True),
        })

    def api_pull(self, _handler: _Handler, body: bytes, reply: _Reply) -> None:
        request = _parse_request(body, "PullRequest")
        name = request.get("model") or request.get("name")
        if not name:
            raise ApiError(400, "invalid model name")
        reply.stream = request.get("stream", True)
        slot = self.slots.get(normalize_tag(name))
        if slot is None or not slot.path.is_file():
            if reply.stream:
                reply.line({"status": "pulling manifest"})
            reply.error(500, "pull model manifest: file does not exist")
            return
        if not reply.stream:
            file_digest(slot.path)
            reply.json(200, {"status": "success"})
            return
        reply.line({"status": "pulling manifest"})
        digest, size = file_digest(slot.path), slot.path.stat().st_size
        reply.line({"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": size,
                    "completed": size})
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            reply.line({"status": status})
        reply.end()

    def _open_request(self, request: Mapping[str, Any]) -> tuple[ModelSlot, dict[str, Any], float]:
        """A parsed generate/chat request's model slot, checked options and keep-alive seconds."""
        name = request.get("model")
        if not name:
            raise ApiError(400, "model is required")
        options = _check_options(request.get("options") or {})
        return self.slot(name), options, parse_keep_alive(request.get("keep_alive"), self.keep_alive)

    def api_generate(self, handler: _Handler, body: bytes, reply: _Reply) -> None:
        started = time.perf_counter()
        with self._counted():
            self._generate(handler, _parse_request(body, "GenerateRequest"), reply, started)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count a request as open while it runs (``peak_in_flight``)."""
        with self._count_lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def _generate(self, handler: _Handler, request: Mapping[str, Any], reply: _Reply, started: float) -> None:
        """Answer a generate request (from /api/generate, or /v1/completions translated)."""
        slot, options, keep_alive = self._open_request(request)
        name = request["model"]
        prompt = request.get("prompt", "")
        raw = request.get("raw", False)
        if raw and (request.get("template") or request.get("system") or request.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        self._check_unsupported(name, request)
        with slot.lock:
            if not prompt and request.get("keep_alive") is not None and keep_alive == 0:
                self._unload(slot)
                reply.json(200, {"model": name, "created_at": _now_utc(), "response": "", "done": True,
                                 "done_reason": "unload"})
                return
            load_s = self._load(slot, options)
            if not prompt:
                self._settle(slot, keep_alive)
                reply.json(200, {"model": name, "created_at": _now_utc(), "response": "", "done": True,
                                 "done_reason": "load"})
                return
            model = slot.model
            assert model is not None
            text = prompt
            if not raw:
                messages = [{"role": "system", "content": request["system"]}] if request.get("system") else []
                text = model.chat_prompt([*messages, {"role": "user", "content": prompt}])
                if request.get("context"):
                    previous = model.llm.detokenize(request["context"]).decode("utf-8", errors="replace")
                    text = previous + text
            reply.stream = request.get("stream", True)

            def chunk(piece: str) -> dict[str, Any]:
                return {"model": name, "created_at": _now_utc(), "response": piece, "done": False}

            def final(response: str, metrics: dict[str, Any]) -> dict[str, Any]:
                body = {"model": name, "created_at": _now_utc(), "response": response, "done": True, **metrics}
                if not raw:
                    tokens = model.llm.tokenize((text + response).encode("utf-8"), add_bos=True, special=True)
                    body["context"] = list(tokens)
                return body

            try:
                self._complete(handler, slot, text, options, reply, chunk, final, started, load_s)
            finally:
                self._settle(slot, keep_alive)

    def api_chat(self, handler: _Handler, body: bytes, reply: _Reply) -> None:
        started = time.perf_counter()
        self._chat(handler, _parse_request(body, "ChatRequest"), reply, started)

    def _chat(self, handler: _Handler, request: Mapping[str, Any], reply: _Reply, started: float) -> None:
        """Answer a chat request (from /api/chat, or /v1/chat/completions translated)."""
        slot, options, keep_alive = self._open_request(request)
        name = request["model"]
        messages = []
        for i, message in enumerate(request.get("messages") or []):
            if not isinstance(message, dict) or not isinstance(message.get("role", ""), str) \
                    or not isinstance(message.get("content") or "", str):
                raise ApiError(400, f"json: cannot unmarshal messages[{i}] into Go struct field ChatRequest.messages "
                                    "of type api.Message")
            if message.get("images"):
                raise ApiError(400, "this model is missing data required for image input")
            messages.append({"role": message.get("role") or "user", "content": message.get("content") or ""})
        if request.get("tools"):
            raise ApiError(400, f"{json.dumps(name)} does not support tools")
        self._check_unsupported(name, request)
        with slot.lock:
            if not messages and request.get("keep_alive") is not None and keep_alive == 0:
                self._unload(slot)
                reply.json(200, {"model": name, "created_at": _now_utc(), "message": {"role": "assistant",
                                 "content": ""}, "done": True, "done_reason": "unload"})
                return
            load_s = self._load(slot, options)
            if not messages:
                self._settle(slot, keep_alive)
                reply.json(200, {"model": name, "created_at": _now_utc(), "message": {"role": "assistant",
                                 "content": ""}, "done": True, "done_reason": "load"})
                return
            model = slot.model
            assert model is not None
            text = model.chat_prompt(messages)
            reply.stream = request.get("stream", True)

            def chunk(piece: str) -> dict[str, Any]:
                return {"model": name, "created_at": _now_utc(), "message": {"role": "assistant", "content": piece},
                        "done": False}

            def final(response: str, metrics: dict[str, Any]) -> dict[str, Any]:
                return {"model": name, "created_at": _now_utc(), "message": {"role": "assistant", "content": response},
                        "done": True, **metrics}

            try:
                self._complete(handler, slot, text, options, reply, chunk, final, started, load_s)
            finally:
                self._settle(slot, keep_alive)

    # OpenAI's wire format, as Ollama's /v1 serves it: requests become /api requests, answers are rewritten

    def api_openai_models(self, _handler: _Handler, _body: bytes, reply: _Reply) -> None:
        """``GET /v1/models``: the pulled models, newest first, as OpenAI's model list."""
        slots = sorted((slot for slot in self.slots.values() if slot.path.is_file()),
                       key=lambda slot: slot.path.stat().st_mtime, reverse=True)
        data = [{"id": slot.tag, "object": "model", "created": int(slot.path.stat().st_mtime),
                 "owned_by": slot.tag.split("/")[-2] if "/" in slot.tag else "library"} for slot in slots]
        reply.json(200, {"object": "list", "data": data or None})  # Go encodes an empty slice as null

    def api_openai_completions(self, handler: _Handler, body: bytes, reply: _Reply) -> None:
        """``POST /v1/completions``: the prompt goes to /api/generate, which applies the chat template (as Ollama's)."""
        started = time.perf_counter()
        request = _parse_request(body, "CompletionRequest")
        generate = {"model": request.get("model", ""), "prompt": request.get("prompt", ""),
                    "suffix": request.get("suffix"), "stream": request.get("stream", False),
                    "options": _openai_options(request)}
        assert isinstance(reply, _OpenAIReply)
        reply.forward(chat=False, stream=generate["stream"], include_usage=_include_usage(request))
        self._generate(handler, {k: v for k, v in generate.items() if v is not None}, reply, started)

    def api_openai_chat(self, handler: _Handler, body: bytes, reply: _Reply) -> None:
        """``POST /v1/chat/completions``: the messages go to /api/chat."""
        started = time.perf_counter()
        request = _parse_request(body, "ChatCompletionRequest")
        if not request.get("messages"):
            raise ApiError(400, "[] is too short - 'messages'")
        response_format = str((request.get("response_format") or {}).get("type") or "").strip().lower()
        chat = {"model": request.get("model", ""), "messages": _openai_messages(request["messages"]),
                "stream": request.get("stream", False), "options": _openai_options(request),
                "tools": request.get("tools"), "format": "json" if response_format == "json_object" else None}
        if response_format == "json_schema":
            chat["format"] = (request["response_format"].get("json_schema") or {}).get("schema")
        assert isinstance(reply, _OpenAIReply)
        reply.forward(chat=True, stream=chat["stream"], include_usage=_include_usage(request))
        self._chat(handler, {k: v for k, v in chat.items() if v is not None}, reply, started)

    @staticmethod
    def _check_unsupported(name: str, request: Mapping[str, Any]) -> None:
        if request.get("think") is True or isinstance(request.get("think"), str):
            raise ApiError(400, f"{json.dumps(name)} does not support thinking")
        if request.get("suffix"):
            raise ApiError(400, f"{json.dumps(name)} does not support insert")
        if request.get("images"):
            raise ApiError(400, "this model is missing data required for image input")
        if request.get("template"):
            raise ApiError(400, "template overrides (Go templates) are not supported by the llmlab loopback server")
        if request.get("format"):
            raise ApiError(400, "format (structured outputs) is not supported by the llmlab loopback server")

    def _complete(self, handler: _Handler, slot: ModelSlot, text: str, options: Mapping[str, Any], reply: _Reply,
                  chunk: Callable[[str], dict[str, Any]], final: Callable[[str, dict[str, Any]], dict[str, Any]],
                  started: float, load_s: float) -> None:
        """Generate from ``text`` and answer: chunks then a final object (stream), or one object."""
        model = slot.model
        assert model is not None
        prompt_tokens = len(model.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        if prompt_tokens >= slot.n_ctx:
            raise ApiError(400, f"input length ({prompt_tokens} tokens) exceeds the context length "
                                f"({slot.n_ctx} tokens); raise num_ctx")
        num_predict = int(options.get("num_predict", -1))
        fail, self.faults.fail_message = self.faults.fail_message, None
        drop_after, self.faults.drop_after = (self.faults.drop_after, None) if reply.stream else (None, None)
        _perf_reset(model)
        completion = model.complete(text, max_tokens=num_predict if num_predict > 0 else -1,
                                    stop=options.get("stop") or None,
                                    temperature=float(options.get("temperature", DEFAULT_TEMPERATURE)),
                                    seed=options.get("seed"))
        pieces: list[str] = []
        try:
            for piece in completion.pieces:
                if fail is not None:
                    raise RuntimeError(fail)
                pieces.append(piece)
                if reply.stream:
                    reply.line(chunk(piece))
                    if drop_after is not None and reply.chunks >= drop_after:
                        handler.hang_up()  # as a crashing server would: no final chunk
                        return
            if fail is not None:
                raise RuntimeError(fail)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the client went away; stop generating
            return
        except Exception as exc:
            reply.error(500, str(exc) or type(exc).__name__)
            return
        finally:
            completion.pieces.close()  # type: ignore[attr-defined] - a generator: releases the model's lock
        metrics = self._metrics(model, completion, started, load_s, prompt_tokens)
        if reply.stream:
            reply.line(final("", metrics))
            reply.end()
        else:
            reply.json(200, final("".join(pieces), metrics))

    @staticmethod
    def _metrics(model: BackingModel, completion: Any, started: float, load_s: float,
                 prompt_tokens: int) -> dict[str, Any]:
        """Ollama's final-chunk fields; counts and durations from llama.cpp's own counters (nanoseconds)."""
        total_ns = int((time.perf_counter() - started) * 1e9)
        first = completion.first_piece_s if completion.first_piece_s is not None else completion.total_s
        prompt_count, prompt_ns = prompt_tokens, int(first * 1e9)
        eval_count, eval_ns = completion.completion_tokens, int(max(0.0, completion.total_s - first) * 1e9)
        perf = _perf_data(model)
        if perf is not None and perf.t_p_eval_ms > 0:
            prompt_count, prompt_ns = int(perf.n_p_eval), int(perf.t_p_eval_ms * 1e6)
            decoded = int(perf.n_eval) if perf.t_eval_ms > 0 else 0  # llama.cpp reports at least 1
            eval_count, eval_ns = decoded + 1, int(perf.t_eval_ms * 1e6)  # + the last sampled token
        return {"done_reason": completion.done_reason, "total_duration": total_ns,
                "load_duration": int(load_s * 1e9), "prompt_eval_count": prompt_count,
                "prompt_eval_duration": prompt_ns, "eval_count": eval_count, "eval_duration": eval_ns}


# --- entry points ------------------------------------------------------------------------------------------------


def default_models() -> dict[str, Path]:
    """The embedded SmolLM2-135M-Instruct as ``smollm2:135m`` and, when its GGUF is available, ``gemma3:270m``."""
    from llmlab_fixtures.errors import ModelUnavailable
    from llmlab_fixtures.models.gguf import GEMMA3_270M, SMOLLM2, embedded_gguf

    models = {"smollm2:135m": embedded_gguf(SMOLLM2)}
    with contextlib.suppress(ModelUnavailable):
        models["gemma3:270m"] = embedded_gguf(GEMMA3_270M)
    return models


@contextlib.contextmanager
def running_ollama_server(models: Mapping[str, str | Path] | None = None, **kwargs: Any) -> Iterator[str]:
    """Serve ``models`` (default: :func:`default_models`) on a free loopback port; yields the base URL."""
    with OllamaServer(models, **kwargs) as server:
        yield server.url


def _model_arg(text: str) -> tuple[str, Path]:
    tag, sep, path = text.partition("=")
    if not sep or not tag or not path:
        raise argparse.ArgumentTypeError(f"--model wants TAG=PATH, got {text!r}")
    if not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"--model {tag}: no file at {path}")
    return tag, Path(path).expanduser()


def main(argv: list[str] | None = None) -> int:
    """``python -m llmlab_fixtures.testing.ollama_server``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m llmlab_fixtures.testing.ollama_server",
                                     description="An Ollama-compatible server on 127.0.0.1 backed by llama-cpp-python.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default 11434; 0 = free)")
    parser.add_argument("--model", type=_model_arg, action="append", default=[], metavar="TAG=PATH",
                        help="serve a GGUF under an Ollama tag (repeatable; default: smollm2:135m and gemma3:270m)")
    parser.add_argument("--keep-alive", default=None, help='how long models stay loaded, e.g. "5m", "30s", "-1"')
    parser.add_argument("--num-ctx", type=int, default=DEFAULT_NUM_CTX, help="default context length (4096)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    try:
        keep_alive = parse_keep_alive(args.keep_alive, DEFAULT_KEEP_ALIVE_S) if args.keep_alive else None
        models = dict(args.model) if args.model else default_models()
        server = OllamaServer(models, port=args.port, keep_alive=keep_alive, num_ctx=args.num_ctx,
                              log=None if args.quiet else sys.stderr)
        server.start()
    except Exception as exc:  # a busy port, a missing model package, a bad --keep-alive: one line
        message = exc.message if isinstance(exc, ApiError) else str(exc)
        print(f"error: cannot start the loopback Ollama server: {message}", file=sys.stderr)
        return 1
    print(f"Listening on {server.url} (llmlab loopback Ollama {VERSION}); models: {', '.join(server.slots)}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
