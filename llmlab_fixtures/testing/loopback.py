"""What the loopback API servers share: scripted faults, the threaded HTTP server, handler plumbing for JSON, text,
SSE and NDJSON replies, stop-sequence scanning and the backing model they load."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from llmlab_fixtures.testing.backing_model import BackingModel

_SECRET_HEADERS = frozenset({"x-api-key", "authorization", "x-goog-api-key"})


# --- faults --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour for the next generation request.

    kinds: ``status`` (an error reply: 429 with ``retry-after``, 500, 503, 529, 401, ...), ``delay`` (say
    nothing for ``seconds``, then hang up: a client timeout), ``malformed`` (a 200 whose body is not valid
    JSON), ``drop`` (start streaming, then cut the connection after ``after_pieces`` text pieces),
    ``stream_error`` (start streaming, then send the API's in-stream error event for ``status``).
    """

    kind: str
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0
    message: str = ""
    after_pieces: int = 1

    @classmethod
    def error(cls, status: int, *, retry_after: float | None = None, message: str = "") -> Fault:
        return cls("status", status=status, retry_after=retry_after, message=message)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def drop(cls, after_pieces: int = 1) -> Fault:
        return cls("drop", after_pieces=after_pieces)

    @classmethod
    def stream_error(cls, status: int = 529, *, after_pieces: int = 1, message: str = "") -> Fault:
        return cls("stream_error", status=status, after_pieces=after_pieces, message=message)


class FaultQueue:
    """Faults for the next requests, one per request, in order (thread-safe)."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()
        self._lock = threading.Lock()

    def push(self, *faults: Fault) -> None:
        with self._lock:
            self._queue.extend(faults)

    def pop(self) -> Fault | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)


# --- generation with stop strings ----------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop string, holding back any tail that could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """The text that is safe to send now."""
        if self.matched is not None:
            return ""
        self.buffer += piece
        hits = [(self.buffer.find(s), s) for s in self.stops if s in self.buffer]
        if hits:
            index, stop = min(hits)
            out, self.buffer, self.matched = self.buffer[:index], "", stop
            return out
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buffer)), keep, -1):
                if self.buffer.endswith(stop[:k]):
                    keep = k
                    break
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return "" if self.matched is not None else out


@dataclass
class Generation:
    """A greedy generation in progress: iterate ``pieces()``; counts and the reason it ended fill in as it runs."""

    prompt_tokens: int
    output_tokens: int = 0
    reason: str = "end"  # end (EOS), length (max tokens), stop (a stop string; see ``stop``)
    stop: str | None = None
    _source: Any = None
    _scanner: StopScanner | None = None
    _completion: Any = None

    def pieces(self) -> Iterator[str]:
        assert self._source is not None and self._scanner is not None
        try:
            for piece in self._source:
                text = self._scanner.feed(piece)
                if text:
                    yield text
                if self._scanner.matched is not None:
                    self.reason, self.stop = "stop", self._scanner.matched
                    break
            else:
                if tail := self._scanner.flush():
                    yield tail
                self.reason = "length" if self._completion.done_reason == "length" else "end"
        finally:
            self._source.close()  # releases the model lock even when the client went away
            self.output_tokens = self._completion.completion_tokens


def start_generation(backing: BackingModel, prompt: str, *, max_tokens: int, stops: list[str],
                     seed: int | None = None) -> Generation:
    """Greedy completion of ``prompt`` by the backing model, cut at the first of ``stops``."""
    completion = backing.complete(prompt, max_tokens=max_tokens, stop=None, temperature=0.0, seed=seed)
    return Generation(prompt_tokens=completion.prompt_tokens, _source=completion.pieces,
                      _scanner=StopScanner(stops), _completion=completion)


# --- the HTTP plumbing ---------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """A request as the server saw it; key values are never kept (``auth`` says how the key came)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    auth: str | None


@dataclass
class LoopbackServer:
    """A running loopback server: where it listens, its fault queue and what it received."""

    base_url: str
    faults: FaultQueue
    backing: BackingModel
    api_key: str | None
    requests: list[RecordedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


class LoopbackHTTPServer(ThreadingHTTPServer):
    """The threaded HTTP server under every stand-in; its ``state`` is what the handlers serve from.

    It binds without a reverse DNS lookup of its address, keeps quiet about clients that hang up, and knows its open
    connections: ``stop(cut_connections=True)`` cuts them (pooled keep-alive ones too), as a server process that exits.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[LoopbackHandler], state: Any = None) -> None:
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look the address up in DNS
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{self.server_name}:{self.server_port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timeouts, closed streams) is normal here; anything else is printed."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def start(self, *, poll_interval: float = 0.05, name: str = "loopback") -> LoopbackHTTPServer:
        """Serve in a daemon thread until ``stop()``."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": poll_interval},
                                        daemon=True, name=name)
        self._thread.start()
        return self

    def stop(self, *, cut_connections: bool = False) -> None:
        """Stop accepting requests and close the socket; ``cut_connections``: also cut the open connections."""
        self.shutdown()
        if cut_connections:
            self.close_connections()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class LoopbackHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler with JSON and text replies, chunked SSE and NDJSON streams, and connection drops.

    An API's conventions are class attributes: ``json_content_type`` and ``json_ensure_ascii`` for JSON bodies
    (replies and NDJSON lines), ``stream_headers`` for the headers every stream carries.
    """

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer
    server_version = "llmlab-loopback/1"
    json_content_type = "application/json"
    json_ensure_ascii = True
    stream_headers: ClassVar[dict[str, str]] = {"Cache-Control": "no-cache"}

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def state(self) -> LoopbackServer:
        return self.server.state  # type: ignore[no-any-return]

    # requests

    def read_body(self) -> bytes:
        """The request body, sent with a Content-Length or in chunked transfer encoding."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def record(self, body: Any, auth: str | None) -> None:
        headers = {k.lower(): ("<redacted>" if k.lower() in _SECRET_HEADERS else v) for k, v in self.headers.items()}
        self.state.record(RecordedRequest(self.command, self.path, headers, body, auth))

    # whole replies

    def json_bytes(self, payload: Any) -> bytes:
        return json.dumps(payload, ensure_ascii=self.json_ensure_ascii).encode("utf-8")

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_raw(status, self.json_bytes(payload), self.json_content_type, headers)

    def send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self.send_raw(status, text.encode("utf-8"), "text/plain; charset=utf-8", headers)

    def send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None,
                 *, declared_length: int | None = None) -> None:
        """A reply with a Content-Length (``declared_length`` may lie, for truncated bodies); no body to HEAD."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data) if declared_length is None else declared_length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    # streams (chunked transfer encoding)

    def start_stream(self, headers: dict[str, str] | None = None, *, content_type: str = "text/event-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        for name, value in {**self.stream_headers, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def write_event(self, data: Any, *, event: str | None = None, newline: str = "\n") -> None:
        """One SSE event: ``data`` as JSON (a str goes as it is, e.g. ``[DONE]``), named by ``event`` if given."""
        text = data if isinstance(data, str) else self.json_bytes(data).decode("utf-8")
        head = f"event: {event}{newline}" if event is not None else ""
        self.write_chunk(f"{head}data: {text}{newline}{newline}".encode())

    def write_ndjson(self, payload: Any) -> None:
        """One NDJSON line (``application/x-ndjson`` streams)."""
        self.write_chunk(self.json_bytes(payload) + b"\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # misbehaving

    def hang_up(self) -> None:
        """Cut the connection now (mid-body, or before any reply)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def delay_then_hang_up(self, seconds: float) -> None:
        time.sleep(seconds)
        self.hang_up()


def serve(handler: type[LoopbackHandler], state_factory: Any) -> Iterator[LoopbackServer]:
    """Run ``handler`` on 127.0.0.1 (a free port) in a thread; yields the state ``state_factory(base_url)`` made."""
    server = LoopbackHTTPServer(("127.0.0.1", 0), handler)
    server.state = state_factory(server.url)
    server.start(name=f"loopback-{handler.__name__}")
    try:
        yield server.state
    finally:
        server.stop()


def load_backing(model_path: Path | None, n_ctx: int = 2048, threads: int = 1) -> BackingModel:
    """The backing model: ``model_path``, or the embedded SmolLM2-135M-Instruct; ``threads`` for all decoding."""
    if model_path is None:
        from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf

        model_path = embedded_gguf(SMOLLM2)
    model = BackingModel(Path(model_path), n_ctx=n_ctx, n_threads=threads)
    # llama.cpp's first decode in a new context is slow (seconds on a busy CPU): pay it now, not in a client's timeout
    for _ in model.complete("Hello", max_tokens=1).pieces:
        pass
    return model


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def serve_api(handler: type[LoopbackHandler], *, model_path: Path | None, api_key: str | None,
              backing: BackingModel | None, n_ctx: int) -> Iterator[LoopbackServer]:
    """Serve ``handler`` on a free loopback port with a backing model (shared, or loaded from ``model_path``)."""
    model = backing or load_backing(model_path, n_ctx)
    yield from serve(handler, lambda url: LoopbackServer(url, FaultQueue(), model, api_key))
