"""Backends behind one interface, and the factory that turns a ModelSpec into a Provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.model_files import resolve_gguf
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)
from llmlab_fixtures.specs import ModelSpec

__all__ = [
    "BackendSettings",
    "GenerationRequest",
    "GenerationResult",
    "LoglikelihoodRequest",
    "LoglikelihoodResult",
    "ModelInfo",
    "Provider",
    "check_available",
    "create_provider",
]


@dataclass(frozen=True)
class BackendSettings:
    """Run-wide knobs every backend receives."""

    threads: int | None = None
    gpu_layers: int = 0
    seed: int = 1234
    model_dirs: tuple[Path, ...] = ()


def _backend_missing(spec: ModelSpec) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {spec.raw!r}: the {spec.backend} backend is not part of this llmlab version yet; "
        "run GGUF models with llama-cpp:<alias|file.gguf> (e.g. local:smollm2-135m)"
    )


def check_available(spec: ModelSpec, settings: BackendSettings) -> None:
    """Raise ModelUnavailable (one line, with the fix) if ``spec`` cannot run here; never loads weights."""
    if spec.backend != "llama-cpp":
        raise _backend_missing(spec)
    from llmlab_fixtures.embedded import check_gguf_file

    check_gguf_file(resolve_gguf(spec.entry, spec.target, settings.model_dirs))


def create_provider(spec: ModelSpec, settings: BackendSettings) -> Provider:
    """An uninitialised Provider for ``spec``; ``initialize()`` checks the file and loads it."""
    if spec.backend != "llama-cpp":
        raise _backend_missing(spec)
    from llmlab_fixtures.providers.llama_cpp import LlamaCppProvider

    return LlamaCppProvider(
        model_path=resolve_gguf(spec.entry, spec.target, settings.model_dirs),
        name=spec.label,
        n_threads=settings.threads,
        n_gpu_layers=settings.gpu_layers,
        seed=settings.seed,
    )
