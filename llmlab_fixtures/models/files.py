"""Find a model's weights on this machine: embedded packages, model directories, the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models.registry import ModelEntry


def model_dirs(extra: tuple[Path, ...] = ()) -> list[Path]:
    """Directories searched for GGUF files: ``--model-dir`` values, then ``LLMLAB_MODEL_DIRS`` (os.pathsep list)."""
    env = [Path(p) for p in os.environ.get("LLMLAB_MODEL_DIRS", "").split(os.pathsep) if p]
    return [p.expanduser() for p in (*extra, *env)]


def hf_cached_file(repo: str, filename: str) -> Path | None:
    """The Hugging Face cache's copy of ``repo``'s ``filename``; None when it is not cached, huggingface_hub is
    missing or ``repo`` is malformed. Never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id=repo, filename=filename)
    except Exception:  # malformed repo ids raise HFValidationError
        return None
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
        ways.append(f"`llmlab download {entry.alias}` (into the Hugging Face cache), "
                    f"or put {gguf['file']} in a directory listed in LLMLAB_MODEL_DIRS / --model-dir")
    if entry.transformers:
        command = f"llmlab download {entry.alias}" + (" --backend transformers" if "repo" in gguf else "")
        ways.append(f"`{command}` and use transformers:{entry.alias}")
    if "ollama" in entry.sources:
        ways.append(f"`ollama pull {entry.sources['ollama']}` and use ollama:{entry.sources['ollama']}")
    return ways


def dir_gguf_files(extra_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Every ``*.gguf`` in the model directories (not recursive), in directory order then by name."""
    found: list[Path] = []
    for directory in model_dirs(extra_dirs):
        if directory.is_dir():
            found += sorted(p for p in directory.glob("*.gguf") if p.is_file())
    return found


def resolve_gguf(entry: ModelEntry | None, target: str, extra_dirs: tuple[Path, ...] = (),
                 backend: str = "llama-cpp", quantization: str | None = None) -> Path:
    """The GGUF file for an alias (the ``quantization`` one if given) or a path; ModelUnavailable otherwise."""
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
    try:
        filename = entry.gguf_file(quantization)
    except LookupError as exc:
        raise ModelUnavailable(str(exc)) from None
    default = quantization is None or filename == gguf.get("file")
    if default and "path" in gguf and Path(gguf["path"]).expanduser().is_file():
        return Path(gguf["path"]).expanduser()
    if default and "package" in gguf:
        from llmlab_fixtures.models.gguf import embedded_gguf

        try:
            return embedded_gguf(gguf["package"])
        except ModelUnavailable:
            if "repo" not in gguf:
                raise
    if filename:
        for directory in model_dirs(extra_dirs):
            if (directory / filename).is_file():
                return directory / filename
        if "repo" in gguf and (cached := hf_cached_file(gguf["repo"], filename)) is not None:
            return cached
    how = how_to_get(entry)
    if quantization and filename:
        how = f"`llmlab download {entry.alias} --quantization {quantization}`"
    raise ModelUnavailable(f"model {entry.alias!r}{f' ({quantization})' if quantization else ''} is not available "
                           f"locally; get it with {how}")


def gguf_for_run(entry: ModelEntry | None, target: str, settings: Any, backend: str = "llama-cpp") -> Path:
    """The GGUF a run uses: ``settings.quantization`` strictly, else the preset's preferred quantization where the
    model has that file here, else the default file."""
    quantization = getattr(settings, "quantization", None)
    preferred = getattr(settings, "preferred_quantization", None)
    has_preferred = entry is not None and preferred and preferred.upper() in {q.upper() for q in entry.gguf_files}
    if has_preferred and not quantization:
        try:
            return resolve_gguf(entry, target, settings.model_dirs, backend, preferred)
        except ModelUnavailable:
            pass
    return resolve_gguf(entry, target, settings.model_dirs, backend, quantization if entry is not None else None)
