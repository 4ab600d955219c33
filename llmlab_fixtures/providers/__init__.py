"""Backends behind one interface: the catalog of backend descriptors, and the factory that turns a ModelSpec into a
Provider.

Each backend declares a ``Backend`` descriptor in its own module (``BACKENDS``; a package declares it in its
``__init__``), whose ``module`` exposes ``check_spec(spec, settings)`` (cheap: file present, key set, server up,
model pulled; raises ModelUnavailable with the fix) and ``make_provider(spec, settings)`` (an uninitialised
Provider). Descriptor modules import no SDK, so a run never imports SDKs it does not use. Adding a backend is one
module (or package) here that declares its descriptor.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.providers.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)

if TYPE_CHECKING:
    from llmlab_fixtures.models.specs import ModelSpec

__all__ = [
    "Backend",
    "BackendSettings",
    "GenerationRequest",
    "GenerationResult",
    "LoglikelihoodRequest",
    "LoglikelihoodResult",
    "ModelInfo",
    "Provider",
    "backend_named",
    "backends",
    "check_available",
    "create_provider",
    "loglikelihood_unsupported",
]


@cache
def backends() -> tuple[Backend, ...]:
    """Every backend, from the descriptors the modules of this package declare, in rank order."""
    found: list[Backend] = []
    for module in pkgutil.iter_modules(__path__):
        found.extend(getattr(importlib.import_module(f"{__name__}.{module.name}"), "BACKENDS", ()))
    return tuple(sorted(found, key=lambda backend: backend.rank))


def backend_named(name: str) -> Backend | None:
    """The backend whose spec prefix (or one of its aliases) is ``name``."""
    for backend in backends():
        if name in (backend.name, *backend.aliases):
            return backend
    return None


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
    scoring: str = "auto"  # --scoring: loglik makes a server that cannot score log-likelihoods unavailable


def _backend_module(spec: ModelSpec) -> ModuleType:
    backend = backend_named(spec.backend)
    if backend is None:
        raise ModelUnavailable(f"model {spec.raw!r}: unknown backend {spec.backend!r}; "
                               f"choose among {', '.join(b.name for b in backends())}")
    return importlib.import_module(backend.module)


def loglikelihood_unsupported(spec: ModelSpec, settings: BackendSettings) -> str | None:
    """Why ``spec`` cannot score multiple choice by log-likelihood, or None when it can (a server is probed once)."""
    backend = backend_named(spec.backend)
    if backend is None or backend.loglik:
        return None
    if backend.loglik_check is None:
        return f"the {backend.name} backend answers by generation only"
    return getattr(importlib.import_module(backend.module), backend.loglik_check)(spec, settings)


def check_available(spec: ModelSpec, settings: BackendSettings) -> None:
    """Raise ModelUnavailable (one line, with the fix) if ``spec`` cannot run here; never loads weights."""
    _backend_module(spec).check_spec(spec, settings)


def create_provider(spec: ModelSpec, settings: BackendSettings) -> Provider:
    """An uninitialised Provider for ``spec``; ``initialize()`` loads the model or connects."""
    return _backend_module(spec).make_provider(spec, settings)
