"""The model registry: aliases with metadata and a source per backend, read from TOML data."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from llmlab_fixtures.providers import backends


def local_backends() -> tuple[str, ...]:
    """Backends that run on this machine (in-process or a local server), in the order ``local:`` tries them."""
    return tuple(b.name for b in backends() if not b.hosted)


def hosted_backends() -> tuple[str, ...]:
    """Backends that reach a remote API."""
    return tuple(b.name for b in backends() if b.hosted)


@dataclass(frozen=True)
class ModelEntry:
    """One registry alias: what the model is and where each backend finds it."""

    alias: str
    display_name: str
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    file_size: int | None = None
    context_length: int | None = None
    license: str | None = None
    gguf: dict[str, Any] | None = None  # {package} embedded, or {repo, file, quantizations} on the Hub, or {path}
    transformers: dict[str, str] | None = None  # {repo}
    sources: dict[str, Any] = field(default_factory=dict)  # backend -> source

    @property
    def backends(self) -> list[str]:
        return list(self.sources)

    @property
    def local_backends(self) -> list[str]:
        return [b for b in self.sources if b in local_backends()]

    @property
    def cloud_backends(self) -> list[str]:
        return [b for b in self.sources if b in hosted_backends()]

    @property
    def gguf_files(self) -> dict[str, str]:
        """GGUF file name per quantization: ``gguf.quantizations`` plus the default ``gguf.file``."""
        gguf = self.gguf or {}
        files = dict(gguf.get("quantizations") or {})
        if "file" in gguf and self.quantization:
            files.setdefault(self.quantization, gguf["file"])
        return files

    def gguf_file(self, quantization: str | None = None) -> str | None:
        """The GGUF file name for ``quantization`` (None: the default file); LookupError lists the ones that exist."""
        gguf = self.gguf or {}
        if quantization is None:
            return gguf.get("file")
        files = {q.upper(): f for q, f in self.gguf_files.items()}
        if quantization.upper() in files:
            return files[quantization.upper()]
        if "package" in gguf and not files and self.quantization and quantization.upper() == self.quantization.upper():
            return None  # the embedded file is this quantization
        known = sorted(self.gguf_files) or ([self.quantization] if self.quantization else [])
        raise LookupError(f"model {self.alias!r} has no {quantization} GGUF; available: {', '.join(known) or 'none'}")


def _entry(alias: str, data: dict[str, Any]) -> ModelEntry:
    sources = {b.name: data[b.registry_key] for b in backends() if b.registry_key in data}
    return ModelEntry(
        alias=alias,
        display_name=data.get("display_name", alias),
        architecture=data.get("architecture"),
        parameters=data.get("parameters"),
        quantization=data.get("quantization"),
        file_size=data.get("file_size"),
        context_length=data.get("context_length"),
        license=data.get("license"),
        gguf=data.get("gguf"),
        transformers=data.get("transformers"),
        sources=sources,
    )


@cache
def builtin_models() -> dict[str, ModelEntry]:
    """The aliases shipped with llmlab (llmlab_fixtures/data/models.toml)."""
    text = files("llmlab_fixtures").joinpath("data/models.toml").read_text(encoding="utf-8")
    return {alias: _entry(alias, data) for alias, data in tomllib.loads(text)["models"].items()}


def load_models(extra_files: tuple[Path, ...] = ()) -> dict[str, ModelEntry]:
    """Built-in aliases plus user models from llmlab.toml / pyproject.toml ``[tool.llmlab.models]``."""
    models = dict(builtin_models())
    for path in extra_files:
        if not path.is_file():
            continue
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if path.name == "pyproject.toml":
            table = data.get("tool", {}).get("llmlab", {}).get("models")
        else:
            table = data.get("models")
        for alias, entry in (table or {}).items():
            models[alias] = _entry(alias, entry)
    return models


def close_matches(name: str, candidates: list[str] | tuple[str, ...] | dict[str, Any]) -> list[str]:
    """Up to three known names that look like ``name``."""
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
