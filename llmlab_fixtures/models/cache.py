"""``llmlab cache list|remove``: model files in the Hugging Face cache and in llmlab's own cache directory."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.models.gguf import default_cache_dir
from llmlab_fixtures.models.registry import ModelEntry
from llmlab_fixtures.providers.transformers.gguf_conversion import converted_entries

MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class CacheEntry:
    """One cached model: a Hugging Face repo folder, a file in llmlab's cache (assembled Gemma), or a GGUF's
    conversion for transformers."""

    kind: str  # "hf", "llmlab" or "converted"
    name: str  # repo id, or the file name
    path: Path  # what ``remove`` deletes
    size: int
    files: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())


def _aliases_for_repo(repo: str, models: dict[str, ModelEntry]) -> tuple[str, ...]:
    return tuple(alias for alias, e in models.items()
                 if repo in ((e.gguf or {}).get("repo"), (e.transformers or {}).get("repo")))


def hf_cache_entries(models: dict[str, ModelEntry]) -> list[CacheEntry]:
    """Model repos in the Hugging Face cache ($HF_HUB_CACHE) that hold weights, biggest first."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return []
    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    entries = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = sorted({f.file_name for rev in repo.revisions for f in rev.files})
        if not any(name.endswith(MODEL_SUFFIXES) for name in files):
            continue
        entries.append(CacheEntry("hf", repo.repo_id, Path(repo.repo_path), int(repo.size_on_disk), tuple(files),
                                  _aliases_for_repo(repo.repo_id, models)))
    return sorted(entries, key=lambda e: -e.size)


def llmlab_cache_entries(models: dict[str, ModelEntry]) -> list[CacheEntry]:
    """GGUF files llmlab keeps in $LLMLAB_CACHE_DIR/models (e.g. Gemma assembled from its chunk packages)."""
    folder = default_cache_dir() / "models"
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.glob("*.gguf")):
        aliases = tuple(alias for alias, e in models.items() if (e.gguf or {}).get("file") == path.name)
        entries.append(CacheEntry("llmlab", path.name, path, path.stat().st_size, (path.name,), aliases))
    return entries


def _embeds(entry: ModelEntry, gguf: Path) -> bool:
    """Whether ``gguf`` is the file this catalogue entry names (by file name, or inside its package)."""
    spec = entry.gguf or {}
    return spec.get("file") == gguf.name or spec.get("package") in gguf.parts


def converted_cache_entries(models: dict[str, ModelEntry]) -> list[CacheEntry]:
    """GGUF files converted for transformers (tokenizer and dequantised weights) in $LLMLAB_CACHE_DIR/converted."""
    entries = []
    for root, facts in converted_entries():
        source = Path(str(facts["gguf"])) if facts.get("gguf") else None
        aliases = tuple(alias for alias, e in models.items() if source and _embeds(e, source))
        files = [p for p in root.rglob("*") if p.is_file()]
        entries.append(CacheEntry("converted", root.name, root, sum(p.stat().st_size for p in files),
                                  tuple(sorted(str(p.relative_to(root)) for p in files)), aliases))
    return entries


def cache_entries(models: dict[str, ModelEntry]) -> list[CacheEntry]:
    return hf_cache_entries(models) + llmlab_cache_entries(models) + converted_cache_entries(models)


def matching(entries: list[CacheEntry], target: str) -> list[CacheEntry]:
    """The entries ``target`` names: an alias, a repo id, a file name, or a path inside an entry."""
    given = Path(os.path.abspath(Path(target).expanduser()))
    found = []
    for entry in entries:
        own = Path(os.path.abspath(entry.path))
        if target in entry.aliases or target == entry.name or given == own or own in given.parents:
            found.append(entry)
    return found


def remove_entry(entry: CacheEntry) -> None:
    """Delete a cached repo folder or conversion, or an llmlab cache file with its verification marker and lock."""
    if entry.kind in ("hf", "converted"):
        shutil.rmtree(entry.path)
        return
    for suffix in ("", ".verified.json", ".lock"):
        entry.path.with_name(entry.path.name + suffix).unlink(missing_ok=True)


def select_for_removal(models: dict[str, ModelEntry], targets: list[str]) -> list[CacheEntry]:
    """The cache entries the targets name; ConfigError for a target that names nothing."""
    entries = cache_entries(models)
    chosen: list[CacheEntry] = []
    for target in targets:
        found = matching(entries, target)
        if not found:
            known = ", ".join(sorted({e.name for e in entries} | {a for e in entries for a in e.aliases}))
            raise ConfigError(f"nothing cached matches {target!r}; cached: {known or 'nothing'} "
                              "(see `llmlab cache list`)")
        chosen += [e for e in found if e not in chosen]
    return chosen
