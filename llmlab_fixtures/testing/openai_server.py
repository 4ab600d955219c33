"""llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) as a loopback subprocess.

It serves ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` for one GGUF under an alias, so the
``openai-compat`` and ``openai`` backends can be tested against a real third-party server with the official SDK.
``--interrupt_requests False`` makes concurrent requests queue instead of cutting the running one short.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _models_answer(url: str, api_key: str | None = None, timeout: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with opener.open(request, timeout=timeout) as response:
            json.loads(response.read())
            return response.status == 200
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running_llama_cpp_openai_server(model_path: Path | str, model_alias: str = "smollm2", *, n_ctx: int = 2048,
                                    n_threads: int = 1, api_key: str | None = None,
                                    startup_timeout: float = 120.0, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Start the server on 127.0.0.1 and a free port; yields its base URL ``http://127.0.0.1:<port>/v1``.

    Waits until ``GET /v1/models`` answers; on a failed start raises RuntimeError with the server's log tail.
    ``api_key``: make the server require this key; ``extra_args``: more server options (``--logits_all true``
    for prompt log-probabilities). The process is terminated (then killed) on exit.
    """
    port = free_port()
    command = [sys.executable, "-m", "llmlab_fixtures.testing.no_repack",  # llama_cpp.server, weights not repacked
               "--model", str(model_path), "--model_alias", model_alias, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
    # both counts: the server's default runs prompts on every CPU, pathologically slow on small shared machines
    command += ["--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)]
    if api_key is not None:
        command += ["--api_key", api_key]
    command += list(extra_args)
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="llmlab-llama-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            try:
                deadline = time.monotonic() + startup_timeout
                probe = f"{base_url}/models"
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"llama_cpp.server exited with code {process.returncode} before "
                                           f"answering {probe}:\n{_tail(log_path)}")
                    if _models_answer(probe, api_key):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"llama_cpp.server did not answer {probe} within {startup_timeout:.0f}s:\n"
                                           f"{_tail(log_path)}")
                    time.sleep(0.2)
                yield base_url
            finally:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)

