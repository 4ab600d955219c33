"""Which requested models can run here: the rest are reported, one line each, while the others run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmlab_fixtures.errors import CredentialsMissing, LlmlabError
from llmlab_fixtures.providers import BackendSettings, check_available
from llmlab_fixtures.specs import ModelSpec


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


def split_available(specs: Sequence[ModelSpec], settings: BackendSettings,
                    ) -> tuple[list[ModelSpec], list[UnavailableModel]]:
    """Check every model (cheaply: files, keys, servers); never loads weights."""
    available: list[ModelSpec] = []
    unavailable: list[UnavailableModel] = []
    for spec in specs:
        try:
            check_available(spec, settings)
        except CredentialsMissing as exc:
            unavailable.append(UnavailableModel(spec.label, str(exc), missing_key=True))
        except LlmlabError as exc:
            unavailable.append(UnavailableModel(spec.label, str(exc)))
        else:
            available.append(spec)
    return available, unavailable
