"""Model specs from the command line (``local:smollm2-135m``, ``llama-cpp:/m.gguf``, ``gpt-4o-mini``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.models.registry import ModelEntry, close_matches, local_backends
from llmlab_fixtures.providers import Backend, backend_named, backends
from llmlab_fixtures.run.network import is_loopback_host

SPEC_SYNTAX = (
    "local:<alias>, llama-cpp:<alias|file.gguf>, transformers:<alias|repo|dir>, ollama:<tag>, "
    "openai:<model>, anthropic:<model>, google:<model>, openai-compat:<base_url>#<model>, or a registered alias"
)


@dataclass(frozen=True)
class ModelSpec:
    """A requested model: which backend runs it and what it points at."""

    raw: str  # as the user wrote it
    backend: str
    target: str  # alias, file path, repo id, Ollama tag or API model name
    entry: ModelEntry | None = None  # registry entry when target is an alias
    base_url: str | None = None  # openai-compat endpoints
    more_urls: tuple[str, ...] = ()  # more servers of the same model (a fleet), after base_url
    api_key_env: str | None = None  # openai-compat: the variable holding that host's key (registry entries)

    @property
    def info(self) -> Backend:
        """The descriptor of this spec's backend."""
        found = backend_named(self.backend)
        if found is None:
            raise ConfigError(f"model {self.raw!r}: unknown backend {self.backend!r}; "
                              f"choose among {', '.join(b.name for b in backends())}")
        return found

    @property
    def label(self) -> str:
        """The model's name in tables, test ids and results: ``<backend>:<alias or target>``, except a hosted API's
        model, which is its bare name."""
        if self.info.hosted and not self.info.url_spec:
            return self.target if self.entry is None else self.entry.alias
        short = self.entry.alias if self.entry else self.target
        if self.backend == "llama-cpp" and self.entry is None:
            short = Path(self.target).name
        return f"{self.backend}:{short}"

    @property
    def urls(self) -> tuple[str, ...]:
        """Every server of this model: base_url, then the fleet's others."""
        return (self.base_url, *self.more_urls) if self.base_url else self.more_urls

    @property
    def is_local(self) -> bool:
        return not self.info.hosted or all(_is_loopback_url(url) for url in self.urls or (None,))


def _is_loopback_url(url: str | None) -> bool:
    from urllib.parse import urlparse

    return bool(url) and is_loopback_host(urlparse(url).hostname)


def backend_installed(backend: str) -> bool:
    """Whether the Python package a backend needs can be imported."""
    found = backend_named(backend)
    package = found.package if found else None
    return package is None or importlib.util.find_spec(package) is not None


def _best_local_backend(entry: ModelEntry) -> str | None:
    for backend in local_backends():
        if backend in entry.sources and backend_installed(backend):
            return backend
    return None


def parse_spec(raw: str, models: dict[str, ModelEntry], *, use_local: bool = False) -> ModelSpec:
    """Turn one ``--models`` item into a ModelSpec; unknown names raise ConfigError with close matches."""
    text = raw.strip()
    if not text:
        raise ConfigError("empty model name in --models; separate models with commas, e.g. --models=local:smollm2-135m")
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() == "local":
        return _local_spec(text, rest, models)
    backend = backend_named(prefix.lower()) if sep else None
    if backend is not None:
        if backend.url_spec:
            base_url, hash_sign, model = rest.rpartition("#")
            if not hash_sign or not base_url or not model:
                raise ConfigError(f"model spec {raw!r}: write {backend.name}:<base_url>#<model>, e.g. "
                                  f"{backend.name}:http://127.0.0.1:8080/v1#smollm2")
            return ModelSpec(text, backend.name, model, models.get(model), base_url=base_url)
        return ModelSpec(text, backend.name, rest, models.get(rest))
    if text in models:
        entry = models[text]
        if entry.local_backends and (use_local or not entry.cloud_backends):
            return _local_spec(text, text, models)
        return _cloud_spec(text, entry)
    if text.lower().endswith(".gguf"):
        return ModelSpec(text, "llama-cpp", text)
    for backend in backends():  # an unregistered bare API model name goes to the backend of its family
        if text.lower().startswith(backend.model_families):
            return ModelSpec(text, backend.name, text)
    raise ConfigError(_unknown_model_message(text, models))


def _cloud_spec(raw: str, entry: ModelEntry) -> ModelSpec:
    backend = entry.cloud_backends[0]
    source = entry.sources[backend]
    if backend_named(backend).url_spec:  # {base_url (one URL or a list: a fleet), model, api_key_env}
        urls = source.get("base_url") if isinstance(source, dict) else None
        urls = [urls] if isinstance(urls, str) else urls
        if not urls or not all(isinstance(u, str) and u for u in urls) or not source.get("model"):
            raise ConfigError(f"model {entry.alias!r}: its {backend} source needs base_url (a URL or a list of "
                              "URLs) and model")
        return ModelSpec(raw, backend, source["model"], entry, base_url=urls[0], more_urls=tuple(urls[1:]),
                         api_key_env=source.get("api_key_env"))
    return ModelSpec(raw, backend, str(source), entry)


def _local_spec(raw: str, target: str, models: dict[str, ModelEntry]) -> ModelSpec:
    if target.lower().endswith(".gguf"):
        return ModelSpec(raw, "llama-cpp", target)
    entry = models.get(target)
    if entry is None:
        if Path(target).is_dir():
            return ModelSpec(raw, "transformers", target)
        raise ConfigError(_unknown_model_message(target, models))
    backend = _best_local_backend(entry)
    if backend is None:
        if not entry.local_backends:
            raise ConfigError(f"model {target!r} has no local form (it is served by {', '.join(entry.backends)}); "
                              f"drop 'local:' to use the API")
        needed = " or ".join(entry.local_backends)
        raise ConfigError(f"model {target!r} needs a local backend ({needed}) that is not installed; "
                          "pip install llama-cpp-python (or transformers)")
    return ModelSpec(raw, backend, target, entry)


def _unknown_model_message(name: str, models: dict[str, ModelEntry]) -> str:
    matches = close_matches(name, models)
    hint = f"did you mean {', '.join(matches)}? " if matches else ""
    return (f"unknown model {name!r}: {hint}`llmlab models` lists the registered aliases; "
            f"a model spec is one of {SPEC_SYNTAX}")


def parse_specs(value: str, models: dict[str, ModelEntry], *, use_local: bool = False) -> list[ModelSpec]:
    """Parse a comma-separated ``--models`` value; duplicates are dropped, order kept. One model served at several
    URLs (``openai-compat:<url1>#m,openai-compat:<url2>#m``) is one model: a fleet over those servers."""
    specs: list[ModelSpec] = []
    for raw in value.split(","):
        if raw.strip():
            spec = parse_spec(raw, models, use_local=use_local)
            same = next((i for i, s in enumerate(specs) if s.label == spec.label), None)
            if same is None:
                specs.append(spec)
            elif spec.info.url_spec and spec.base_url not in specs[same].urls:
                specs[same] = replace(specs[same], raw=f"{specs[same].raw},{spec.raw}",
                                      more_urls=(*specs[same].more_urls, *spec.urls))
    if not specs:
        raise ConfigError("--models is empty; give e.g. --models=local:smollm2-135m")
    return specs
