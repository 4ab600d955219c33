"""What the cloud backends share: API keys, the retry policy, stop handling, usage recording and the error lines.

One policy for every cloud SDK: the SDKs' own retries are switched off (``max_retries=0`` for openai/anthropic,
no ``HttpRetryOptions`` for google-genai) and :func:`CloudProvider.generate` retries here, so every backend
retries the same failures (429, 5xx including Anthropic's 529, timeouts, dropped connections — also when the
connection drops in the middle of a stream, which the SDKs' retries do not cover), with the same exponential
backoff with jitter, honouring ``Retry-After``, and counts them for the results.

Keys are read from the usual variables and never written anywhere: not in messages, exceptions, ModelInfo,
``GenerationResult.extra`` or logs. Every failure text that came from a server is scrubbed of the key.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib
import os
import random
import re
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from llmlab_fixtures.errors import CredentialsMissing, LlmlabError, ModelUnavailable
from llmlab_fixtures.eval.metrics import cut_at_stop
from llmlab_fixtures.providers.base import GenerationRequest, GenerationResult, ModelInfo, Provider
from llmlab_fixtures.run.network import data_location

if TYPE_CHECKING:
    from llmlab_fixtures.models.specs import ModelSpec
    from llmlab_fixtures.providers import BackendSettings

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})
REDACTED = "[redacted]"
_REASON_CHARS = 200


# --- API keys ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """A key and the variable it came from; its repr never shows the value."""

    variable: str | None  # None: a placeholder, no variable set
    value: str = field(repr=False)

    def __repr__(self) -> str:
        return f"ApiKey(variable={self.variable!r}, value={REDACTED!r})"

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced."""
        if self.variable is None or not self.value or len(self.value) < 4:
            return text
        return text.replace(self.value, REDACTED)


def missing_key_message(label: str, variables: Sequence[str]) -> str:
    names = variables[0] if len(variables) == 1 else f"{variables[0]} (or {' or '.join(variables[1:])})"
    return f"model {label}: {names} is not set; export it (or drop the model) — the other models still run"


def require_key(label: str, variables: Sequence[str]) -> ApiKey:
    """The first of ``variables`` that is set (and not blank), or CredentialsMissing naming them."""
    for name in variables:
        value = os.environ.get(name, "").strip()
        if value:
            return ApiKey(name, value)
    raise CredentialsMissing(missing_key_message(label, variables))


def optional_key(variable: str, placeholder: str) -> ApiKey:
    """``$variable`` if set, else a placeholder that is no secret (servers that need no key ignore it)."""
    value = os.environ.get(variable, "").strip()
    return ApiKey(variable, value) if value else ApiKey(None, placeholder)


def import_sdk(label: str, module: str, pip_name: str) -> ModuleType:
    """Import an official SDK, or ModelUnavailable naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelUnavailable(f"model {label}: the {pip_name} SDK is not installed ({exc}); "
                               f"run: pip install {pip_name}") from None


def sdk_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def host_of(url: str) -> str:
    """``host[:port]`` of a URL, without credentials, path or query (what ModelInfo may show)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parsed.port}" if parsed.port else host


# --- failures and the retry policy ---------------------------------------------------------------------


class ApiRequestFailed(LlmlabError):
    """A cloud request failed for good (after retries, or not retryable): one line naming the cause."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "status", retries: int = 0,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.retries = retries
        self.request_id = request_id


@dataclass(eq=False)
class ApiFailure(Exception):
    """One failed attempt, classified. ``kind``: status, timeout, connection, auth, malformed."""

    kind: str
    reason: str
    status: int | None = None
    retry_after: float | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.describe())

    @property
    def retryable(self) -> bool:
        if self.kind in ("timeout", "connection"):
            return True
        return self.kind == "status" and self.status in RETRYABLE_STATUS

    def describe(self) -> str:
        if self.kind == "timeout":
            return f"timeout ({self.reason})" if self.reason else "timeout"
        if self.kind == "connection":
            return f"connection error ({self.reason})" if self.reason else "connection error"
        if self.status is not None:
            return f"{self.status} {self.reason}".strip()
        return self.reason


def short_reason(*parts: Any) -> str:
    """The non-empty parts joined with ': ', on one line, cut to a readable length."""
    text = ": ".join(str(p) for p in parts if p not in (None, ""))
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds, fractional allowed, or an HTTP date)."""
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        if "retry-after" in lowered:
            value = lowered["retry-after"].strip()
            try:
                return max(0.0, float(value))
            except ValueError:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, OverflowError):
        return None
    return None


def parse_duration(text: Any) -> float | None:
    """A protobuf duration string such as ``"1.5s"`` (Google RetryInfo.retryDelay) in seconds."""
    if isinstance(text, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", text)):
        return float(match.group(1))
    return None


def transport_failure(exc: BaseException) -> ApiFailure | None:
    """httpx/httpx2/httpcore timeouts and connection errors (raised by every SDK mid-stream), else None."""
    for cls in type(exc).__mro__:
        package = cls.__module__.split(".")[0]
        if package not in ("httpx", "httpx2", "httpcore"):
            continue
        if cls.__name__ in ("TimeoutException", "ReadTimeout", "ConnectTimeout", "WriteTimeout", "PoolTimeout"):
            return ApiFailure("timeout", short_reason(type(exc).__name__))
        if cls.__name__ in ("TransportError", "NetworkError", "ProtocolError", "RemoteProtocolError"):
            return ApiFailure("connection", short_reason(type(exc).__name__, exc))
    if isinstance(exc, TimeoutError):
        return ApiFailure("timeout", type(exc).__name__)
    if isinstance(exc, ConnectionError):
        return ApiFailure("connection", short_reason(type(exc).__name__, exc))
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (base · 2^n, capped) with jitter in its upper half; a server's Retry-After wins (capped)."""

    max_retries: int = 4
    base_delay: float = 1.0
    max_delay: float = 30.0
    max_retry_after: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * (2 ** retry))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class RetryOutcome:
    retries: int = 0
    waited_s: float = 0.0
    failures: list[str] = field(default_factory=list)  # described failures that were retried


def run_with_retries(attempt: Callable[[], Any], classify: Callable[[BaseException], ApiFailure | None],
                     policy: RetryPolicy, outcome: RetryOutcome,
                     sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call ``attempt`` until it succeeds, a failure is not retryable, or ``policy.max_retries`` are spent.

    Exceptions ``classify`` does not recognise propagate unchanged; the last ApiFailure is raised otherwise.
    """
    while True:
        try:
            return attempt()
        except Exception as exc:
            failure = exc if isinstance(exc, ApiFailure) else classify(exc)
            if failure is None:
                raise
            if not failure.retryable or outcome.retries >= policy.max_retries:
                raise failure from None
            wait = policy.delay(outcome.retries, failure.retry_after)
            outcome.failures.append(failure.describe())
            sleep(wait)
            outcome.waited_s += wait
            outcome.retries += 1


# --- stop sequences ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopPlan:
    """Which stop strings go to the API (within its limits) and which are cut here only."""

    sent: tuple[str, ...]
    local_only: tuple[str, ...]
    all: tuple[str, ...]


def plan_stops(stops: Iterable[str], *, limit: int, whitespace_ok: bool = True) -> StopPlan:
    """Send at most ``limit`` non-empty stops (and no whitespace-only ones where the API refuses them)."""
    usable = tuple(dict.fromkeys(s for s in stops if s))
    candidates = [s for s in usable if whitespace_ok or s.strip()]
    sent = tuple(candidates[:limit])
    return StopPlan(sent=sent, local_only=tuple(s for s in usable if s not in sent), all=usable)


@dataclass
class StreamResult:
    """What one streamed attempt produced."""

    text: str = ""
    ttft_s: float | None = None
    chunks: int = 0  # non-empty text deltas
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    usage: dict[str, Any] | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    stopped_locally: bool = False  # a stop the API was not given appeared: the stream was closed early


class TextCollector:
    """Joins text deltas, times the first non-empty one, and says when a local-only stop has appeared."""

    def __init__(self, result: StreamResult, plan: StopPlan, started: float) -> None:
        self.result = result
        self.plan = plan
        self.started = started
        self._parts: list[str] = []

    def add(self, piece: str | None) -> bool:
        """Add a delta; True when the stream can be closed (a stop the API does not know has been generated)."""
        if not piece:
            return False
        if self.result.ttft_s is None:
            self.result.ttft_s = time.perf_counter() - self.started
        self.result.chunks += 1
        self._parts.append(piece)
        self.result.text = "".join(self._parts)
        if self.plan.local_only and any(s in self.result.text for s in self.plan.local_only):
            self.result.stopped_locally = True
            return True
        return False


def jsonable(value: Any) -> Any:
    """Usage objects from the SDKs (pydantic models, dicts) as plain JSON data, None fields dropped."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# --- the provider base ---------------------------------------------------------------------------------


class CloudProvider(Provider):
    """A model behind an HTTP API, reached through its official SDK; thread-safe ``generate``.

    Subclasses build the SDK client (``_make_client``), run one streamed request (``_stream_once``) and
    classify SDK exceptions (``_classify``); retries, stops, timing and error lines live here.
    """

    supports_loglikelihood = False
    api_name = "cloud"  # the name in error lines: "<api_name> API failed after ..."
    api_kind = ""  # the endpoint, for ModelInfo (chat.completions, completions, messages, generateContent)
    sdk_distribution = ""
    stop_limit = 4
    stop_whitespace_ok = True

    def __init__(self, spec: ModelSpec, settings: BackendSettings, key: ApiKey, base_url: str) -> None:
        self.spec = spec
        self.settings = settings
        self.label: str = spec.label
        self.model: str = spec.target
        self.key = key
        self.base_url = base_url
        self.timeout = float(settings.request_timeout)
        self.seed: int = settings.seed
        self.max_concurrency = max(1, int(settings.concurrency))
        self.retry_policy = RetryPolicy(max_retries=max(0, int(settings.max_retries)))
        self._client: Any = None
        self._lock = threading.Lock()

    # subclass hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def _make_client(self) -> Any:
        """The SDK client, with its own retries off and ``self.timeout`` as its timeout."""

    @abstractmethod
    def _stream_once(self, client: Any, request: GenerationRequest, plan: StopPlan, started: float) -> StreamResult:
        """One streamed request; raise ApiFailure (or an SDK exception ``_classify`` knows) on failure."""

    @abstractmethod
    def _classify(self, exc: BaseException) -> ApiFailure | None:
        """An SDK/transport exception as an ApiFailure, or None if it is not an API failure."""

    # Provider ---------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def initialize(self) -> None:
        """Create the SDK client (no request is made)."""
        _ = self.client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        closer = getattr(client, "close", None)
        if callable(closer):
            with contextlib.suppress(Exception):  # closing is best effort
                closer()

    def estimate_memory(self) -> int:
        return 0

    def get_model_info(self) -> ModelInfo:
        version = sdk_version(self.sdk_distribution) if self.sdk_distribution else None
        extra: dict[str, Any] = {"api_model": self.model, "base_url": host_of(self.base_url), "api": self.api_kind}
        if version:
            extra["sdk"] = f"{self.sdk_distribution} {version}"
        return ModelInfo(name=self.label, backend=self.spec.backend, data_location=data_location(self.base_url),
                         extra=extra)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Stream one greedy completion (retrying transient failures) and return it cut at the first stop."""
        plan = plan_stops(request.stop, limit=self.stop_limit, whitespace_ok=self.stop_whitespace_ok)
        client = self.client
        outcome = RetryOutcome()
        started = time.perf_counter()

        def attempt() -> StreamResult:
            return self._stream_once(client, request, plan, time.perf_counter())

        try:
            result: StreamResult = run_with_retries(attempt, self._classify, self.retry_policy, outcome)
        except ApiFailure as failure:
            raise self._failure_error(failure, outcome.retries) from None
        total_s = time.perf_counter() - started
        completion = result.completion_tokens if result.completion_tokens is not None else result.chunks
        prompt = result.prompt_tokens or 0
        extra: dict[str, Any] = {
            "usage": result.usage,
            "token_counts": "api" if result.completion_tokens is not None else "stream chunks (no usage sent)",
            "retries": outcome.retries,
            "request_id": result.request_id,
            "finish_reason": result.finish_reason,
        }
        if outcome.retries:
            extra["retry_wait_s"] = round(outcome.waited_s, 3)
            extra["retried_failures"] = [self.key.redact(f) for f in outcome.failures]
        if result.stopped_locally:
            extra["stopped_locally"] = True
        if plan.local_only:
            extra["local_stops"] = list(plan.local_only)
        return GenerationResult(
            text=cut_at_stop(result.text, plan.all),
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_s=result.ttft_s,
            total_s=total_s,
            evaluated_tokens=max(0, prompt - result.cached_tokens),
            extra=extra,
        )

    # error lines ------------------------------------------------------------------------------------

    def _key_rejected_message(self, failure: ApiFailure) -> str:
        if self.key.variable is None:
            return (f"model {self.label}: the server at {host_of(self.base_url)} requires an API key "
                    f"({failure.describe()}); set it in LLMLAB_OPENAI_COMPAT_API_KEY")
        return (f"model {self.label}: the API rejected the key in {self.key.variable} ({failure.describe()}); "
                "check it or replace it")

    def _failure_error(self, failure: ApiFailure, retries: int) -> ApiRequestFailed:
        """The one line the evaluator records for this item."""
        api = self.api_name
        if failure.kind == "auth":
            message = self._key_rejected_message(failure)
        elif failure.retryable:
            message = f"model {self.label}: {api} API failed after {retries} retries: {failure.describe()}"
        elif failure.kind == "malformed":
            message = f"model {self.label}: {api} API returned a malformed response: {failure.reason}"
        else:
            message = f"model {self.label}: {api} API rejected the request: {failure.describe()}"
        return ApiRequestFailed(self.key.redact(message), status=failure.status, kind=failure.kind, retries=retries,
                                request_id=failure.request_id)


def sdk_connection_failure(sdk: ModuleType, exc: BaseException, timeout: float) -> ApiFailure | None:
    """A timeout or a dropped connection as the openai and anthropic SDKs raise them (one client generator)."""
    if isinstance(exc, sdk.APITimeoutError):  # a subclass of APIConnectionError: test it first
        return ApiFailure("timeout", f"no answer within {timeout:g}s")
    if isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        return ApiFailure("connection", short_reason(type(cause).__name__ if cause else "", cause or exc.message))
    return None


def status_failure(status: int, reason: str, *, headers: Mapping[str, str] | None = None,
                   request_id: str | None = None, auth: bool = False) -> ApiFailure:
    """An HTTP error status as an ApiFailure (401/403, or ``auth``: the key was rejected)."""
    kind = "auth" if auth or status in (401, 403) else "status"
    return ApiFailure(kind, short_reason(reason), status=status, retry_after=parse_retry_after(headers),
                      request_id=request_id)


def malformed_failure(exc: BaseException) -> ApiFailure:
    return ApiFailure("malformed", short_reason(type(exc).__name__, exc))
