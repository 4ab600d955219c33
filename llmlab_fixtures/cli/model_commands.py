"""``llmlab download``, ``llmlab cache list|remove`` and ``llmlab system``: the subcommands that manage model files
and show what this machine offers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.models.files import hf_cached_file
from llmlab_fixtures.models.registry import ModelEntry, close_matches, load_models
from llmlab_fixtures.reports.table import format_size, text_grid

RESOURCE_COMMANDS = ("download", "cache", "system")
USER_MODEL_FILES = (Path("llmlab.toml"), Path("pyproject.toml"))


def add_resource_commands(commands: Any) -> None:
    """Register the subcommands on ``llmlab``'s subparsers."""
    download = commands.add_parser("download", help="download a registered model into the Hugging Face cache")
    download.add_argument("alias", help="a registry alias (see `llmlab models`)")
    download.add_argument("--quantization", default=None, help="which GGUF file, e.g. Q4_K_M or Q8_0")
    download.add_argument("--backend", choices=("llama-cpp", "transformers"), default=None,
                          help="the GGUF (llama-cpp, default when there is one) or the transformers repo")
    download.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache = commands.add_parser("cache", help="list or remove cached model files")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="models in the Hugging Face cache and in llmlab's cache directory")
    remove = actions.add_parser("remove", help="delete cached models by alias, repo id or path")
    remove.add_argument("targets", nargs="+", help="aliases, repo ids, file names or paths")
    remove.add_argument("--yes", action="store_true", help="delete without asking")
    commands.add_parser("system", help="GPUs, llama.cpp GPU offload, memory and cores of this machine")


def run_resource_command(args: argparse.Namespace) -> int:
    if args.command == "download":
        return _download(args)
    if args.command == "cache":
        return _cache_list() if args.action == "list" else _cache_remove(args.targets, args.yes)
    print("\n".join(system_lines()))
    return 0


def _entry(alias: str) -> ModelEntry:
    models = load_models(USER_MODEL_FILES)
    if alias not in models:
        close = close_matches(alias, models)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {alias!r}{hint}; `llmlab models` lists the aliases")
    return models[alias]


def _download(args: argparse.Namespace) -> int:
    from llmlab_fixtures.models.download import download_model

    result = download_model(_entry(args.alias), args.quantization, args.backend, revision=args.revision,
                            progress=not args.no_progress)
    print(result.line)
    return 0


def cache_lines(models: dict[str, ModelEntry]) -> list[str]:
    from llmlab_fixtures.models.cache import cache_entries

    entries = cache_entries(models)
    if not entries:
        return ["no cached models (llmlab download <alias> fetches one)"]
    rows = [[e.kind, e.name, format_size(e.size), ",".join(e.aliases) or "-",
             ", ".join(f for f in e.files if f.endswith((".gguf", ".safetensors")))[:60] or "-", str(e.path)]
            for e in entries]
    total = sum(e.size for e in entries)
    return [*text_grid(["cache", "name", "size", "aliases", "weights", "path"], rows, markdown=False, rule=False),
            f"total {format_size(total)}"]


def _cache_list() -> int:
    print("\n".join(cache_lines(load_models(USER_MODEL_FILES))))
    return 0


def _cache_remove(targets: list[str], yes: bool) -> int:
    from llmlab_fixtures.models.cache import remove_entry, select_for_removal

    chosen = select_for_removal(load_models(USER_MODEL_FILES), targets)
    for entry in chosen:
        print(f"{'removing' if yes else 'would remove'} {entry.name} ({format_size(entry.size)}): {entry.path}")
    if not yes:
        if sys.stdin.isatty() and input("delete these? [y/N] ").strip().lower() in ("y", "yes"):
            yes = True
        else:
            print("nothing deleted; add --yes to delete", file=sys.stderr)
            return 1
    for entry in chosen:
        remove_entry(entry)
    print(f"freed {format_size(sum(e.size for e in chosen))}")
    return 0


def system_lines() -> list[str]:
    """``llmlab system``: accelerators, llama.cpp offload, memory and cores."""
    from llmlab_fixtures.models.resources import system_info

    info = system_info(use_torch=True)
    lines = [f"memory: {format_size(info['memory_available'])} available of {format_size(info['memory_total'])}; "
             f"cores: {info['physical_cores']} physical, {info['logical_cores']} logical"]
    offload = info["llama_cpp_gpu_offload"]
    lines.append("llama.cpp GPU offload: " + {None: "llama-cpp-python not installed", True: "supported",
                                              False: "not in this build (CPU only)"}[offload])
    torch = info.get("torch")
    if torch:
        lines.append(f"torch {torch['torch']}: CUDA {'available' if torch['cuda_available'] else 'not available'}"
                     f" (build {torch['cuda'] or '-'}, ROCm {torch['hip'] or '-'}), "
                     f"MPS {'available' if torch['mps_available'] else 'not available'}")
    if not info["gpus"]:
        lines.append("GPUs: none found (nvidia-smi, torch, Apple Metal): models run on the CPU")
    for gpu in info["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']} ({gpu['kind']}, via {gpu['source']}), "
                     f"{format_size(gpu['free_bytes'])} free of {format_size(gpu['total_bytes'])}")
    return lines


# --- `llmlab models`: what is here beyond the registry ------------------------------------------------


def estimated(size: int | None) -> str:
    """A size worked out from the registry rather than measured on a file (``~`` in front)."""
    return "-" if not size else f"~{format_size(size)}"


def hf_cached_repo(entry: ModelEntry) -> Path | None:
    """The snapshot folder of ``entry``'s transformers repo when the Hugging Face cache holds its config.json."""
    config = hf_cached_file((entry.transformers or {})["repo"], "config.json")
    return None if config is None else config.parent


def _gguf_row(path: Path, where: str) -> dict[str, str]:
    from llmlab_fixtures.errors import LlmlabError
    from llmlab_fixtures.models.gguf import gguf_metadata
    from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

    try:
        meta = gguf_metadata(path)
        memory = format_size(LlamaCppProvider(path, path.stem, n_ctx=4096).estimate_memory())
    except LlmlabError as exc:
        return {"alias": f"llama-cpp:{path}", "params": "-", "quant": "-", "size": format_size(path.stat().st_size),
                "ctx": "-", "memory@4k": "-", "sources": "llama-cpp", "license": "-", "where": f"unusable: {exc}"}
    params = meta.get("parameters")
    return {"alias": f"llama-cpp:{path}",
            "params": "-" if not params else f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M",
            "quant": meta.get("quantization") or "-", "size": format_size(meta.get("file_size")),
            "ctx": str(meta.get("context_length") or "-"), "memory@4k": memory, "sources": "llama-cpp",
            "license": "-", "where": where}


def discovered_rows(models: dict[str, ModelEntry], model_dirs: tuple[Path, ...] = ()) -> list[dict[str, str]]:
    """Unregistered models found here: GGUF files in the model directories (metadata from their headers) and
    Hugging Face cache repos no alias points at."""
    from llmlab_fixtures.models.cache import hf_cache_entries
    from llmlab_fixtures.models.files import dir_gguf_files

    registered = {f for e in models.values() for f in [*e.gguf_files.values(), (e.gguf or {}).get("file")] if f}
    rows = [_gguf_row(path, "available: model dir (unregistered)") for path in dir_gguf_files(model_dirs)
            if path.name not in registered]
    for cached in hf_cache_entries(models):
        if cached.aliases:
            continue
        ggufs = [f for f in cached.files if f.endswith(".gguf")]
        if ggufs:
            snapshot = next(cached.path.glob(f"snapshots/*/{ggufs[0]}"), None)
            if snapshot is not None:
                rows += [_gguf_row(snapshot, "available: HF cache (unregistered)")]
                continue
        rows.append({"alias": f"transformers:{cached.name}", "params": "-", "quant": "-",
                     "size": format_size(cached.size), "ctx": "-", "memory@4k": "-", "sources": "transformers",
                     "license": "-", "where": "available: HF cache (unregistered)"})
    return rows
