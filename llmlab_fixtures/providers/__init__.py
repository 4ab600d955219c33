"""Backends behind one interface, and the factory that turns a ModelSpec into a Provider.

Each backend module exposes ``check_spec(spec, settings)`` (cheap: file present, key set, server up, model
pulled; raises ModelUnavailable with the fix) and ``make_provider(spec, settings)`` (an uninitialised Provider).
Modules are imported lazily so a run never imports SDKs it does not use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models.specs import ModelSpec
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)

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

BACKEND_MODULES = {
    "llama-cpp": "llmlab_fixtures.providers.llama_cpp.provider",
    "transformers": "llmlab_fixtures.providers.transformers.provider",
    "ollama": "llmlab_fixtures.providers.ollama",
    "openai": "llmlab_fixtures.providers.openai_api",
    "openai-compat": "llmlab_fixtures.providers.openai_api",
    "anthropic": "llmlab_fixtures.providers.anthropic_api",
    "google": "llmlab_fixtures.providers.google_api",
}


@dataclass(frozen=True)
class BackendSettings:
    """Run-wide knobs every backend receives (each uses the ones that apply to it)."""

    threads: int | None = None
    gpu_layers: int | None = 0  # llama.cpp n_gpu_layers / Ollama num_gpu; -1 = all layers; None = auto (fit VRAM)
    seed: int = 1234
    model_dirs: tuple[Path, ...] = ()
    device: str = "auto"  # transformers: auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    batch_size: int | None = None  # transformers rows per forward pass; None = auto (probe down on OOM)
    parallel_sequences: int = 4  # llama.cpp: items side by side in KV-cache streams of their own (1 = one at a time)
    request_timeout: float = 60.0  # seconds per HTTP request (Ollama, cloud)
    max_retries: int = 4  # cloud: retries on 429/5xx/timeouts, with exponential backoff
    concurrency: int = 4  # cloud: requests in flight per model
    max_memory: int | None = None  # bytes an in-process model may take; None = the RAM available now
    n_ctx: int | None = None  # llama.cpp context / transformers max length; None = the backend's default
    dtype: str = "auto"  # transformers weights: auto, float32, float16, bfloat16
    quantization: str | None = None  # GGUF file by quantization (--quantization: a model without it is skipped)
    preferred_quantization: str | None = None  # from a preset: used where a model has it, else its default file


def _backend_module(spec: ModelSpec) -> ModuleType:
    name = BACKEND_MODULES.get(spec.backend)
    if name is None:
        raise ModelUnavailable(f"model {spec.raw!r}: unknown backend {spec.backend!r}; "
                               f"choose among {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(name)


def check_available(spec: ModelSpec, settings: BackendSettings) -> None:
    """Raise ModelUnavailable (one line, with the fix) if ``spec`` cannot run here; never loads weights."""
    _backend_module(spec).check_spec(spec, settings)


def create_provider(spec: ModelSpec, settings: BackendSettings) -> Provider:
    """An uninitialised Provider for ``spec``; ``initialize()`` loads the model or connects."""
    return _backend_module(spec).make_provider(spec, settings)
