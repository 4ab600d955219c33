"""Which requested models can run here: the rest are reported, one line each, while the others run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmlab_fixtures.errors import CredentialsMissing, LlmlabError, ModelUnavailable
from llmlab_fixtures.models.resources import fits
from llmlab_fixtures.models.specs import ModelSpec
from llmlab_fixtures.providers import BackendSettings, check_available, create_provider


@dataclass(frozen=True)
class UnavailableModel:
    """A requested model that will not run, and why."""

    label: str
    reason: str
    missing_key: bool = False  # a cloud key is not set: the model is skipped, which is not an error

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "reason": self.reason, "missing_key": self.missing_key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnavailableModel:
        return cls(str(data["label"]), str(data["reason"]), bool(data.get("missing_key")))

    @property
    def line(self) -> str:
        return f"skipped {self.label}: {self.reason}"


def memory_limit(settings: BackendSettings) -> tuple[int, str]:
    """The bytes a model may take, and where that figure comes from (--max-memory, else available RAM)."""
    if settings.max_memory is not None:
        return settings.max_memory, "--max-memory"
    import psutil

    return int(psutil.virtual_memory().available), "available memory"


def check_memory(spec: ModelSpec, settings: BackendSettings) -> None:
    """An in-process model whose estimated footprint exceeds free RAM (or, for the part offloaded to a GPU, free
    VRAM) is refused before it can exhaust the machine."""
    if not spec.info.in_process:
        return
    provider = create_provider(spec, settings)
    needed = provider.estimate_memory()
    on_gpu = gpu_share(provider, settings)
    vram = None
    if on_gpu:
        from llmlab_fixtures.models.resources import free_vram

        vram = free_vram()
    limit, source = memory_limit(settings)
    reason = fits(int(needed * (1 - on_gpu)), limit, int(needed * on_gpu), vram, source)
    if reason:
        raise ModelUnavailable(f"model {spec.label} {reason}")


def gpu_share(provider: Any, settings: BackendSettings) -> float:
    """The fraction of the model's memory that goes to a GPU (llama.cpp offloaded layers, transformers on CUDA)."""
    from llmlab_fixtures.models.resources import offloaded_share

    if spec_layers := getattr(provider, "n_gpu_layers", 0):
        return offloaded_share(provider.metadata, spec_layers)
    return 1.0 if str(settings.device).startswith("cuda") else 0.0


def split_available(specs: Sequence[ModelSpec], settings: BackendSettings,
                    ) -> tuple[list[ModelSpec], list[UnavailableModel]]:
    """Check every model (cheaply: files, keys, servers); never loads weights."""
    available: list[ModelSpec] = []
    unavailable: list[UnavailableModel] = []
    for spec in specs:
        try:
            check_available(spec, settings)
            check_memory(spec, settings)
        except CredentialsMissing as exc:
            unavailable.append(UnavailableModel(spec.label, str(exc), missing_key=True))
        except LlmlabError as exc:
            unavailable.append(UnavailableModel(spec.label, str(exc)))
        else:
            available.append(spec)
    return available, unavailable
