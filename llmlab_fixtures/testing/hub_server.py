"""A loopback stand-in for the Hugging Face Hub (``HF_ENDPOINT=http://127.0.0.1:<port>``).

It speaks what huggingface_hub calls for a file download: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}`` with
X-Repo-Commit, ETag and X-Linked-Etag (the file's sha256, as the Hub sends for LFS files), X-Linked-Size,
Content-Length, Accept-Ranges and ``Range: bytes=N-`` (206 replies); ``POST /api/models/{repo}/paths-info/{revision}``
(``lfs.oid``); ``GET /api/models/{repo}[/revision/{revision}]`` (model info with its siblings) and
``GET /api/models/{repo}/tree/{revision}`` (the listing ``snapshot_download`` reads). Scripted faults:
``drop_after`` cuts the next file body after that many bytes; ``corrupt`` serves a file with one byte flipped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from llmlab_fixtures.models.gguf import sha256_file
from llmlab_fixtures.testing.loopback import LoopbackHandler, RecordedRequest, serve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_CHUNK = 1 << 20


@dataclass
class HubFile:
    path: Path
    size: int
    sha256: str


@dataclass
class HubState:
    """The stand-in Hub: its files per repo, scripted faults and every request it received."""

    base_url: str
    files: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    drop_after: int | None = None  # cut the next file body after this many bytes (once)
    corrupt: set[str] = field(default_factory=set)  # file names served with one byte flipped
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def add(self, repo: str, filename: str, path: Path) -> HubFile:
        entry = HubFile(path, path.stat().st_size, sha256_file(path))
        self.files.setdefault(repo, {})[filename] = entry
        return entry

    def take_drop(self) -> int | None:
        with self._lock:
            drop, self.drop_after = self.drop_after, None
            return drop

    def file_requests(self, method: str = "GET") -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and "/resolve/" in r.path]


class HubHandler(LoopbackHandler):
    server_version = "llmlab-hub-loopback/1"

    @property
    def hub(self) -> HubState:
        return self.server.state  # type: ignore[return-value]

    def _split(self) -> tuple[str, list[str]]:
        path = unquote(urlsplit(self.path).path)
        return path, [p for p in path.split("/") if p]

    def _find(self, parts: list[str]) -> tuple[str, str, HubFile | None] | None:
        """``org/name/resolve/rev/file...`` -> (repo, file name, file or None)."""
        if "resolve" not in parts or parts.index("resolve") < 1 or len(parts) < parts.index("resolve") + 3:
            return None
        at = parts.index("resolve")
        repo, filename = "/".join(parts[:at]), "/".join(parts[at + 2:])
        return repo, filename, self.hub.files.get(repo, {}).get(filename)

    def _not_found(self, repo: str) -> None:
        kind = "EntryNotFound" if repo in self.hub.files else "RepoNotFound"
        self.send_json(404, {"error": f"{kind}: {repo}"}, {"X-Error-Code": kind, "X-Repo-Commit": COMMIT}
                       if kind == "EntryNotFound" else {"X-Error-Code": kind})

    def _file_headers(self, found: HubFile) -> dict[str, str]:
        etag = f'"{found.sha256}"'
        return {"X-Repo-Commit": COMMIT, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(found.size),
                "Accept-Ranges": "bytes"}

    def do_HEAD(self) -> None:
        self.record(None, None)
        _, parts = self._split()
        located = self._find(parts)
        if located is None or located[2] is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.send_header("X-Error-Code", "EntryNotFound" if located and located[0] in self.hub.files
                             else "RepoNotFound")
            self.end_headers()
            return
        found = located[2]
        self.send_response(200)
        for name, value in {**self._file_headers(found), "content-length": str(found.size)}.items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:
        self.record(None, None)
        path, parts = self._split()
        if parts[:2] == ["api", "models"]:
            self._model_info(parts[2:])
            return
        located = self._find(parts)
        if located is None or located[2] is None:
            self._not_found(located[0] if located else path)
            return
        self._send_file(located[1], located[2])

    def do_POST(self) -> None:
        body = self.read_body()
        self.record(body.decode("utf-8", "replace"), None)
        _, parts = self._split()
        if parts[:2] != ["api", "models"] or "paths-info" not in parts:
            self.send_json(404, {"error": "not found"})
            return
        at = parts.index("paths-info")
        repo = "/".join(parts[2:at])
        form = parse_qs(body.decode("utf-8"))
        wanted = form.get("paths", [])
        files = self.hub.files.get(repo)
        if files is None:
            self._not_found(repo)
            return
        infos = [{"type": "file", "path": name, "size": f.size, "oid": f.sha256[:40],
                  "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                 for name, f in files.items() if name in wanted]
        self.send_json(200, infos)

    def _model_info(self, rest: list[str]) -> None:
        """``{org}/{name}[/revision/{rev}]``: model info; ``{org}/{name}/tree/{rev}``: the file listing."""
        repo = "/".join(rest[:2])
        files = self.hub.files.get(repo)
        if files is None:
            self._not_found(repo)
            return
        if rest[2:3] == ["tree"]:
            self.send_json(200, [{"type": "file", "path": name, "size": f.size, "oid": f.sha256[:40],
                                  "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                                 for name, f in files.items()])
            return
        self.send_json(200, {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                             "siblings": [{"rfilename": name, "size": f.size} for name, f in files.items()]})

    def _send_file(self, filename: str, found: HubFile) -> None:
        start = 0
        range_header = self.headers.get("range", "")
        if range_header.startswith("bytes=") and range_header[6:].split("-")[0].isdigit():
            start = int(range_header[6:].split("-")[0])
        if start >= found.size and found.size:
            self.send_json(416, {"error": "range not satisfiable"})
            return
        length = found.size - start
        self.send_response(206 if start else 200)
        headers = {**self._file_headers(found), "content-type": "application/octet-stream",
                   "content-length": str(length)}
        if start:
            headers["content-range"] = f"bytes {start}-{found.size - 1}/{found.size}"
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        drop = self.hub.take_drop()
        sent = 0
        with found.path.open("rb") as handle:
            handle.seek(start)
            while block := handle.read(_CHUNK):
                if filename in self.hub.corrupt and start + sent <= found.size // 2 < start + sent + len(block):
                    i = found.size // 2 - start - sent
                    block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
                if drop is not None and sent + len(block) >= drop:
                    with contextlib.suppress(OSError):
                        self.wfile.write(block[: drop - sent])
                    self.hang_up()
                    return
                try:
                    self.wfile.write(block)
                except OSError:
                    return
                sent += len(block)
        self.wfile.flush()


@contextlib.contextmanager
def running_hub_server() -> Iterator[HubState]:
    """A stand-in Hub on a free loopback port; add files with ``state.add(repo, filename, path)``."""
    yield from serve(HubHandler, HubState)  # type: ignore[arg-type]
