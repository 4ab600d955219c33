"""The backend catalog: every list of backends comes from the descriptors the backend modules declare."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import llmlab_fixtures.providers as providers
from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models.registry import builtin_models, hosted_backends, local_backends
from llmlab_fixtures.models.specs import parse_spec
from llmlab_fixtures.providers import BackendSettings, backend_named, backends, check_available
from llmlab_fixtures.reports.cost import is_cloud

ECHO_BACKEND = '''
from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.providers.base import Backend

BACKENDS = (Backend("echo", __name__, rank=35, aliases=("parrot",)),)


def check_spec(spec, settings):
    raise ModelUnavailable(f"echo cannot serve {spec.target}: no echo server here")


def make_provider(spec, settings):
    raise AssertionError("not reached")
'''


def test_every_backend_is_declared_once_with_a_module_that_serves_it() -> None:
    names = [name for backend in backends() for name in (backend.name, *backend.aliases)]
    assert len(names) == len(set(names))
    assert [b.name for b in backends()] == ["llama-cpp", "transformers", "ollama", "openai", "openai-compat",
                                            "anthropic", "google"]
    for backend in backends():
        module = importlib.import_module(backend.module)
        assert callable(module.check_spec) and callable(module.make_provider), backend.name


def test_lists_of_backends_come_from_the_descriptors() -> None:
    assert local_backends() == ("llama-cpp", "transformers", "ollama")
    assert hosted_backends() == ("openai", "openai-compat", "anthropic", "google")
    assert [b.name for b in backends() if b.in_process] == ["llama-cpp", "transformers"]
    assert backend_named("gguf") is backend_named("llama-cpp")
    assert backend_named("claude").price_provider == "anthropic"
    assert is_cloud("google") and not is_cloud("ollama")


def test_registry_sources_are_keyed_by_the_descriptors() -> None:
    entry = builtin_models()["smollm2-135m"]
    assert entry.local_backends[0] == "llama-cpp"
    assert all(backend_named(source) for model in builtin_models().values() for source in model.sources)


def test_a_new_backend_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that declares a descriptor in the providers package is a backend: specs, labels and the
    availability check reach it, with no table edited."""
    (tmp_path / "echo_backend.py").write_text(ECHO_BACKEND)
    monkeypatch.setattr(providers, "__path__", [*providers.__path__, str(tmp_path)])
    backends.cache_clear()
    try:
        spec = parse_spec("parrot:hello", builtin_models())
        assert (spec.backend, spec.label, spec.is_local, spec.info.loglik) == ("echo", "echo:hello", True, False)
        assert [b.name for b in backends()][2:4] == ["ollama", "echo"]
        with pytest.raises(ModelUnavailable, match="echo cannot serve hello: no echo server here"):
            check_available(spec, BackendSettings())
    finally:
        monkeypatch.undo()
        backends.cache_clear()
        sys.modules.pop("llmlab_fixtures.providers.echo_backend", None)
    assert backend_named("echo") is None
