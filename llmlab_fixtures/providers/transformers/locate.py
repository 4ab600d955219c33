"""Where a transformers model comes from: the local Hugging Face cache (a repo snapshot), a local directory with
safetensors and a tokenizer, or a GGUF file that transformers dequantises at load time; and whether the packages and
the GGUF architecture it needs are there. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models.files import resolve_gguf

INSTALL_HINT = "pip install transformers gguf accelerate"
# GGUF architecture names that transformers' GGUF loader spells differently
_GGUF_ARCH_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "t5encoder": "t5"}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """What ``initialize()`` loads: a GGUF file, a Hugging Face cache snapshot, or a local directory."""

    kind: str  # "gguf", "hf-cache" or "directory"
    path: Path  # the .gguf file, or the directory holding config.json + weights + tokenizer
    repo: str | None = None  # Hugging Face repo id, when known

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def _require_packages(gguf: bool) -> None:
    """ModelUnavailable naming the pip command when torch/transformers (and, for GGUF, gguf/accelerate) are missing."""
    if importlib.util.find_spec("torch") is None:
        raise ModelUnavailable(
            "torch is not installed; install the build you want first (CPU: pip install torch --index-url "
            f"https://download.pytorch.org/whl/cpu), then {INSTALL_HINT}"
        )
    needed = ("transformers", "gguf", "accelerate") if gguf else ("transformers",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailable(f"the transformers backend needs {', '.join(missing)}; run: {INSTALL_HINT}")


def _has_weights(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in _WEIGHT_GLOBS)


def cached_snapshot(repo: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo`` holding config.json and weights, or None (no network)."""
    from llmlab_fixtures.models.files import hf_cached_file

    config = hf_cached_file(repo, "config.json")
    return config.parent if config is not None and _has_weights(config.parent) else None


def _transformers_ways(entry: Any) -> str:
    from llmlab_fixtures.models.files import ways_to_get

    ways = [way for way in ways_to_get(entry) if "ollama" not in way]
    repo = (entry.transformers or {}).get("repo")
    if repo and not any(f"download {repo}`" in way for way in ways):
        ways.append(f"`huggingface-cli download {repo}`")
    return "; or ".join(ways) if ways else "register a transformers repo or a GGUF for it in llmlab.toml"


def _check_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path} has no config.json; a transformers model directory needs config.json, "
                               "*.safetensors weights and tokenizer files (or give a .gguf file)")
    if not _has_weights(path):
        raise ModelUnavailable(f"{path} has no *.safetensors (or pytorch_model*.bin) weights; "
                               "copy the model's weight files next to config.json")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelUnavailable(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                               "copy them from the model's repository")


def resolve_source(spec: Any, settings: Any) -> ModelSource:
    """Where ``spec`` (a ModelSpec) loads from; ModelUnavailable with the way to get it otherwise.

    An alias prefers its transformers repo when that is in the local Hugging Face cache, else its local GGUF.
    """
    target: str = spec.target
    entry = spec.entry
    if entry is not None:
        repo = (entry.transformers or {}).get("repo")
        if repo and (snapshot := cached_snapshot(repo)) is not None:
            return ModelSource("hf-cache", snapshot, repo)
        if entry.gguf:
            try:
                return ModelSource("gguf", resolve_gguf(entry, target, settings.model_dirs), repo)
            except ModelUnavailable:
                pass
        raise ModelUnavailable(f"model {entry.alias!r} is not available locally for transformers; "
                               f"get it with {_transformers_ways(entry)}")
    if target.lower().endswith(".gguf"):
        return ModelSource("gguf", resolve_gguf(None, target, settings.model_dirs, backend="transformers"))
    path = Path(target).expanduser()
    if path.is_dir():
        _check_directory(path)
        return ModelSource("directory", path)
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise ModelUnavailable(f"model directory {target} does not exist; check the path after transformers:")
    snapshot = cached_snapshot(target)
    if snapshot is None:
        raise ModelUnavailable(f"{target} is not in the local Hugging Face cache; get it with "
                               f"`huggingface-cli download {target}` (llmlab loads transformers models offline)")
    return ModelSource("hf-cache", snapshot, target)


def gguf_supported_architectures() -> set[str]:
    """GGUF architectures this transformers can load (read from its GGUF tables, without importing torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def check_gguf_architecture(path: Path) -> dict[str, Any]:
    """The GGUF header of ``path``; ModelUnavailable if transformers has no loader for its architecture."""
    from llmlab_fixtures.models.gguf import gguf_metadata

    meta = gguf_metadata(path)
    arch = str(meta.get("architecture") or "")
    names = {arch, arch.replace("-", "_"), _GGUF_ARCH_NAMES.get(arch, arch)}
    if names & gguf_supported_architectures():
        return meta
    try:  # architectures only the newer GGUF path knows (importing it imports torch)
        from transformers.integrations.gguf import GGUF_ARCHS

        if arch in GGUF_ARCHS:
            return meta
    except ImportError:
        pass
    import transformers

    raise ModelUnavailable(f"transformers {transformers.__version__} cannot load GGUF architecture {arch!r} "
                           f"({path.name}); run it with llama-cpp:{path} instead")
