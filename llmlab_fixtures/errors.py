"""User-facing errors: one clear line that names the fix."""

from __future__ import annotations


class LlmlabError(Exception):
    """A problem the user can fix; its message is printed as a single line and the run exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(LlmlabError):
    """Bad option values or an unusable data directory."""


class ModelUnavailable(LlmlabError):
    """A requested model cannot be loaded here (not downloaded, backend missing, key missing, ...)."""


class DataError(LlmlabError):
    """A dataset file is missing, malformed or empty."""


class CredentialsMissing(ModelUnavailable):
    """A cloud model's API key is not set; the model is skipped and the others run."""
