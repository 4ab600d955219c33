"""Find a model's weights on this machine: embedded packages, model directories, the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.registry import ModelEntry


def model_dirs(extra: tuple[Path, ...] = ()) -> list[Path]:
    """Directories searched for GGUF files: ``--model-dir`` values, then ``LLMLAB_MODEL_DIRS`` (os.pathsep list)."""
    env = [Path(p) for p in os.environ.get("LLMLAB_MODEL_DIRS", "").split(os.pathsep) if p]
    return [p.expanduser() for p in (*extra, *env)]


def _hf_cached_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo, filename=filename)
    return Path(found) if isinstance(found, str) else None


def how_to_get(entry: ModelEntry) -> str:
    """One sentence naming the ways to make ``entry`` available offline."""
    ways = ways_to_get(entry)
    return "; or ".join(ways) if ways else "register a source for it in llmlab.toml"


def ways_to_get(entry: ModelEntry) -> list[str]:
    """The commands that would make ``entry`` available, most direct first."""
    ways: list[str] = []
    gguf = entry.gguf or {}
    if "install" in gguf:
        ways.append(f"`{gguf['install']}`")
    if "repo" in gguf and "file" in gguf:
        ways.append(f"`huggingface-cli download {gguf['repo']} {gguf['file']}` (found in the Hugging Face cache), "
                    f"or put {gguf['file']} in a directory listed in LLMLAB_MODEL_DIRS / --model-dir")
    if entry.transformers:
        ways.append(f"`huggingface-cli download {entry.transformers['repo']}` and use transformers:{entry.alias}")
    if "ollama" in entry.sources:
        ways.append(f"`ollama pull {entry.sources['ollama']}` and use ollama:{entry.sources['ollama']}")
    return ways


def resolve_gguf(entry: ModelEntry | None, target: str, extra_dirs: tuple[Path, ...] = (),
                 backend: str = "llama-cpp") -> Path:
    """The GGUF file for an alias or a path; ModelUnavailable with the ways to get it otherwise."""
    if entry is None:
        path = Path(target).expanduser()
        if not path.is_file():
            for directory in model_dirs(extra_dirs):
                if (directory / target).is_file():
                    return directory / target
            raise ModelUnavailable(f"GGUF file {target} does not exist; check the path after {backend}:")
        return path
    gguf = entry.gguf
    if not gguf:
        raise ModelUnavailable(f"model {entry.alias!r} has no GGUF form for llama.cpp; "
                               f"use one of its backends: {', '.join(entry.backends)}")
    if "path" in gguf and Path(gguf["path"]).expanduser().is_file():
        return Path(gguf["path"]).expanduser()
    if "package" in gguf:
        from llmlab_fixtures.embedded import embedded_gguf

        try:
            return embedded_gguf(gguf["package"])
        except ModelUnavailable:
            if "repo" not in gguf:
                raise
    if "file" in gguf:
        for directory in model_dirs(extra_dirs):
            if (directory / gguf["file"]).is_file():
                return directory / gguf["file"]
        if "repo" in gguf and (cached := _hf_cached_file(gguf["repo"], gguf["file"])) is not None:
            return cached
    raise ModelUnavailable(f"model {entry.alias!r} is not available locally; get it with {how_to_get(entry)}")
