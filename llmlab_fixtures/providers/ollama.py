"""Ollama backend: models served by an Ollama server, reached through the official ``ollama`` client (unmodified).

The host comes from ``OLLAMA_HOST`` exactly as the client resolves it (default ``http://127.0.0.1:11434``).
Ollama returns no prompt log-probabilities, so multiple choice is scored by generation. Prompts are sent raw
(no chat template) so the model sees the same text as the in-process backends, and decoding is greedy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from llmlab_fixtures.errors import LlmlabError, ModelUnavailable
from llmlab_fixtures.eval.metrics import cut_at_stop
from llmlab_fixtures.providers.base import Backend, GenerationRequest, GenerationResult, ModelInfo, Provider
from llmlab_fixtures.run.network import data_location

BACKENDS = (Backend("ollama", __name__, rank=30, package="ollama", registry_key="ollama"),)

KEEP_ALIVE = "30m"  # how long Ollama keeps the model loaded between items
ALL_LAYERS = 999  # num_gpu for --gpu-layers -1: more layers than any model has, i.e. offload everything
MAX_CONTEXT = 8192  # num_ctx = the model's trained context, capped like the llama.cpp backend
CHECK_TIMEOUT_S = 15.0  # seconds the availability check waits for /api/tags
TIMING_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                 "eval_duration")


def _ollama() -> Any:
    try:
        import ollama
    except ImportError as exc:
        raise ModelUnavailable(f"the ollama Python client is not installed ({exc}); run: pip install ollama") from exc
    return ollama


def env_host() -> str | None:
    """The raw ``OLLAMA_HOST`` value (None when unset or empty)."""
    return os.environ.get("OLLAMA_HOST") or None


def resolve_host(host: str | None = None) -> str:
    """The base URL the ollama client uses for ``host`` (or ``OLLAMA_HOST``), e.g. ``http://127.0.0.1:11434``."""
    _ollama()
    from ollama._client import _parse_host  # the client's own resolution, so messages name the URL it dials

    return _parse_host(host or env_host())


def normalize_tag(tag: str) -> str:
    """Ollama's matching form of a model name: ``x`` and ``x:latest`` are the same model; case is ignored."""
    tag = tag.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        if tag.lower().startswith(prefix):
            tag = tag[len(prefix):]
    if ":" not in tag.rsplit("/", 1)[-1]:
        tag += ":latest"
    return tag.lower()


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the client raises when the server cannot be reached or drops the connection."""
    import httpx

    return ConnectionError, httpx.TransportError, OSError


def _blocked_by_guard(exc: BaseException) -> BaseException | None:
    """The --local-only guard's refusal hidden in ``exc``'s chain, if that is why the connection failed."""
    from llmlab_fixtures.run.network import RemoteConnectionBlocked

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RemoteConnectionBlocked):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str:
    """A short reason for a transport failure: 'connection refused', the httpx message, ..."""
    import httpx

    if isinstance(exc, httpx.ConnectError) or (isinstance(exc, ConnectionError) and "Failed to connect" in str(exc)):
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__}); raise --request-timeout if the model is slow"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unreachable_message(url: str) -> str:
    return f"cannot reach Ollama at {url}: start it with `ollama serve` (or set OLLAMA_HOST)"


def not_pulled_message(tag: str) -> str:
    return f"Ollama model {tag} is not pulled: run `ollama pull {tag}`"


def _client(host: str | None, timeout: float) -> Any:
    return _ollama().Client(host=host, timeout=timeout)


def _pulled(client: Any) -> dict[str, Any]:
    """The server's pulled models by matching name (``/api/tags``)."""
    return {normalize_tag(m.model): m for m in client.list().models if m.model}


def _listed_models(host: str, timeout: float) -> dict[str, Any]:
    """``/api/tags`` of the server at ``host`` by matching name; ModelUnavailable in one line when it fails."""
    url = resolve_host(host)
    client = _client(host, timeout)
    try:
        return _pulled(client)
    except _transport_errors() as exc:
        blocked = _blocked_by_guard(exc)
        raise ModelUnavailable(str(blocked) if blocked else unreachable_message(url)) from None
    except _ollama().ResponseError as exc:
        raise ModelUnavailable(f"Ollama at {url} could not list its models: {exc.error} "
                               f"(HTTP {exc.status_code})") from None
    finally:
        client.close()


def list_pulled_models(host: str | None = None, timeout: float = CHECK_TIMEOUT_S) -> list[dict[str, Any]]:
    """Models pulled on the Ollama server at ``host`` (default: OLLAMA_HOST), for discovery (``llmlab models``).

    Each is a dict with name, size, digest, modified_at (ISO 8601), format, family, families, parameter_size,
    quantization_level and host. Raises ModelUnavailable when the server cannot be reached.
    """
    url = resolve_host(host or env_host())
    out = []
    for m in _listed_models(host or env_host(), timeout).values():
        details = m.details
        out.append({
            "name": m.model,
            "size": int(m.size) if m.size is not None else None,
            "digest": m.digest,
            "modified_at": m.modified_at.isoformat() if m.modified_at else None,
            "format": details.format if details else None,
            "family": details.family if details else None,
            "families": list(details.families or []) if details else [],
            "parameter_size": details.parameter_size if details else None,
            "quantization_level": details.quantization_level if details else None,
            "host": url,
        })
    return out


def check_spec(spec: Any, settings: Any) -> None:
    """The Ollama server answers and has ``spec.target`` pulled (nothing is loaded)."""
    tag = spec.target
    if not tag:
        raise ModelUnavailable(f"model spec {spec.raw!r}: write ollama:<tag>, e.g. ollama:smollm2:135m")
    pulled = _listed_models(env_host(), min(float(settings.request_timeout), CHECK_TIMEOUT_S))
    if normalize_tag(tag) not in pulled:
        raise ModelUnavailable(not_pulled_message(tag))


def make_provider(spec: Any, settings: Any) -> OllamaProvider:
    """An OllamaProvider for ``spec`` (a ModelSpec: target is the tag) with the run's BackendSettings."""
    return OllamaProvider(
        tag=spec.target,
        name=spec.label,
        host=env_host(),
        threads=settings.threads,
        gpu_layers=settings.gpu_layers,
        seed=settings.seed,
        request_timeout=settings.request_timeout,
        concurrency=settings.concurrency,
    )


class OllamaProvider(Provider):
    """A model served by Ollama: raw greedy generation over HTTP, Ollama's own timings kept per item."""

    backend = "ollama"
    supports_loglikelihood = False

    def __init__(self, tag: str, name: str | None = None, *, host: str | None = None, threads: int | None = None,
                 gpu_layers: int = 0, seed: int = 1234, request_timeout: float = 60.0,
                 keep_alive: str | float = KEEP_ALIVE, num_ctx: int | None = None, concurrency: int = 1) -> None:
        self.tag = tag
        # requests in flight (--concurrency): a server with parallel slots (OLLAMA_NUM_PARALLEL) serves them side by
        # side; one with a single slot queues them, and each item's latency then includes its wait
        self.max_concurrency = max(1, int(concurrency))
        self.name = name or f"ollama:{tag}"
        self.host = host
        self.url = resolve_host(host)
        self.threads = threads
        self.gpu_layers = gpu_layers
        self.seed = seed
        self.request_timeout = request_timeout
        self.keep_alive = keep_alive
        self.requested_num_ctx = num_ctx
        self._client: Any = None
        self._show: Any = None
        self._listing: Any = None
        self._version: str | None = None
        self.load_s: float | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def initialize(self) -> None:
        """Connect, read the model's metadata (/api/show, /api/tags) and load it with a warm-up request."""
        if self._client is not None:
            return
        client = _client(self.host, self.request_timeout)
        try:
            self._fetch_metadata(client)
            started = time.perf_counter()
            self._call(lambda: client.generate(model=self.tag, prompt="", keep_alive=self.keep_alive,
                                               options=self.load_options()), loading=True)
            self.load_s = time.perf_counter() - started
        except BaseException:
            client.close()
            raise
        self._client = client

    def _fetch_metadata(self, client: Any) -> None:
        ollama = _ollama()
        try:
            self._show = client.show(self.tag)
            self._listing = _pulled(client).get(normalize_tag(self.tag))
        except ollama.ResponseError as exc:
            if exc.status_code == 404:
                raise ModelUnavailable(not_pulled_message(self.tag)) from None
            raise ModelUnavailable(f"Ollama at {self.url} could not describe {self.tag}: {exc.error} "
                                   f"(HTTP {exc.status_code})") from None
        except _transport_errors() as exc:
            blocked = _blocked_by_guard(exc)
            raise ModelUnavailable(str(blocked) if blocked else unreachable_message(self.url)) from None
        self._version = self._server_version()

    def _server_version(self) -> str | None:
        import httpx

        try:
            return str(httpx.get(f"{self.url}/api/version", timeout=5.0).json().get("version"))
        except Exception:
            return None

    def close(self) -> None:
        """Unload the model (keep_alive 0) and close the connection; errors are ignored (the server may be gone)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.generate(model=self.tag, keep_alive=0)
        except Exception:
            pass
        finally:
            client.close()

    def _require(self) -> Any:
        if self._client is None:
            raise LlmlabError(f"model {self.name} is not connected; call initialize() first")
        return self._client

    # --- requests ----------------------------------------------------------------------------

    @property
    def model_info(self) -> Mapping[str, Any]:
        """The GGUF key/values Ollama reports in /api/show (empty before initialize)."""
        return (self._show.modelinfo or {}) if self._show is not None else {}

    @property
    def context_length(self) -> int | None:
        info = self.model_info
        value = info.get(f"{info.get('general.architecture')}.context_length")
        return int(value) if value else None

    @property
    def num_ctx(self) -> int:
        """The context Ollama loads the model with: the trained context, at most 8192 (prompts are not truncated)."""
        return self.requested_num_ctx or min(self.context_length or 4096, MAX_CONTEXT)

    def load_options(self) -> dict[str, Any]:
        """Options that decide how Ollama loads the model (the same on every request, so it never reloads)."""
        options: dict[str, Any] = {"num_ctx": self.num_ctx}
        if self.threads:
            options["num_thread"] = self.threads
        if self.gpu_layers:
            options["num_gpu"] = ALL_LAYERS if self.gpu_layers < 0 else self.gpu_layers
        return options

    def generation_options(self, request: GenerationRequest) -> dict[str, Any]:
        """Greedy decoding (temperature 0, no repeat penalty), the run's seed, num_predict and stop strings."""
        options = {"temperature": 0.0, "seed": self.seed, "repeat_penalty": 1.0,
                   "num_predict": request.max_new_tokens, **self.load_options()}
        stops = [s for s in request.stop if s]
        if stops:
            options["stop"] = stops
        return options

    def _call(self, function: Any, *, loading: bool = False) -> Any:
        """Run one client call, turning client errors into one-line LlmlabErrors."""
        ollama = _ollama()
        try:
            return function()
        except ollama.ResponseError as exc:
            raise self._response_error(exc) from None
        except _transport_errors() as exc:
            blocked = _blocked_by_guard(exc)
            if blocked is not None:
                raise LlmlabError(str(blocked)) from None
            if loading:
                raise ModelUnavailable(unreachable_message(self.url)) from None
            raise LlmlabError(f"Ollama at {self.url} stopped answering: {_describe(exc)}") from None

    def _response_error(self, exc: Any) -> LlmlabError:
        if exc.status_code == 404:
            return ModelUnavailable(not_pulled_message(self.tag))
        status = f" (HTTP {exc.status_code})" if exc.status_code and exc.status_code > 0 else ""
        return LlmlabError(f"Ollama at {self.url} failed on {self.tag}: {exc.error}{status}")

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Raw greedy generation, streamed to time the first token; Ollama's timing fields go into ``extra``."""
        client = self._require()
        started = time.perf_counter()
        pieces: list[str] = []
        ttft: float | None = None
        final: Any = None

        def run() -> None:
            nonlocal ttft, final
            stream = client.generate(model=self.tag, prompt=request.prompt, raw=True, stream=True,
                                     options=self.generation_options(request), keep_alive=self.keep_alive)
            for chunk in stream:
                if chunk.response:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    pieces.append(chunk.response)
                if chunk.done:
                    final = chunk

        self._call(run)
        total = time.perf_counter() - started
        if final is None:
            raise LlmlabError(f"Ollama at {self.url} stopped answering: the stream ended before its final chunk")
        extra: dict[str, Any] = {name: getattr(final, name, None) for name in TIMING_FIELDS}
        extra["done_reason"] = final.done_reason
        prompt_tokens = int(final.prompt_eval_count or 0)
        return GenerationResult(
            text=cut_at_stop("".join(pieces), request.stop),
            prompt_tokens=prompt_tokens,
            completion_tokens=int(final.eval_count or 0),
            ttft_s=ttft,
            total_s=total,
            evaluated_tokens=prompt_tokens,
            extra=extra,
        )

    # --- info --------------------------------------------------------------------------------

    def get_model_info(self) -> ModelInfo:
        """Model facts from /api/show and /api/tags (only name and location before initialize)."""
        info = self.model_info
        details = self._show.details if self._show is not None else None
        listing = self._listing
        add_bos = info.get("tokenizer.ggml.add_bos_token")
        parameters = info.get("general.parameter_count")
        extra: dict[str, Any] = {
            "host": self.url,
            "tag": self.tag,
            "ollama_version": self._version,
            "digest": listing.digest if listing is not None else None,
            "family": details.family if details else None,
            "parameter_size": details.parameter_size if details else None,
            "format": details.format if details else None,
            "capabilities": list(self._show.capabilities or []) if self._show is not None else None,
            "num_ctx": self.num_ctx if self._show is not None else self.requested_num_ctx,
            "num_thread": self.threads,
            "num_gpu": self.load_options().get("num_gpu") if self._show is not None else None,
            "keep_alive": self.keep_alive,
            "seed": self.seed,
            "load_s": self.load_s,
        }
        return ModelInfo(
            name=self.name,
            backend=self.backend,
            path=None,
            architecture=info.get("general.architecture") or (details.family if details else None),
            parameters=int(parameters) if parameters else None,
            quantization=details.quantization_level if details else None,
            context_length=self.context_length,
            file_size=int(listing.size) if listing is not None and listing.size is not None else None,
            add_bos_token=bool(add_bos) if add_bos is not None else None,
            data_location=data_location(self.url),
            extra=extra,
        )

    def estimate_memory(self) -> int:
        """The weights (/api/tags size) plus an f16 KV cache of num_ctx positions, from /api/show's model_info."""
        if self._show is None:
            client = _client(self.host, self.request_timeout)
            try:
                self._fetch_metadata(client)
            finally:
                client.close()
        info = self.model_info
        arch = info.get("general.architecture")

        def field(name: str) -> Any:
            return info.get(f"{arch}.{name}")

        n_layer = int(field("block_count") or 0)
        heads = field("attention.head_count") or 0
        heads_kv = field("attention.head_count_kv") or heads
        n_embd = int(field("embedding_length") or 0)
        n_head = max(heads) if isinstance(heads, list) else int(heads)
        default_dim = n_embd // n_head if n_head else 0
        kv_dims = int(field("attention.key_length") or default_dim) + int(field("attention.value_length")
                                                                          or default_dim)
        per_layer = heads_kv if isinstance(heads_kv, list) and heads_kv else [heads_kv] * n_layer
        kv_bytes = self.num_ctx * sum(int(h) * kv_dims for h in per_layer) * 2
        size = int(self._listing.size) if self._listing is not None and self._listing.size is not None else 0
        return size + kv_bytes + (64 << 20)
