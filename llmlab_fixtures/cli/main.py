"""The ``llmlab`` command: ``llmlab models`` lists every registered model and whether it can run here, and the
models pulled into Ollama."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmlab_fixtures.cli.model_commands import (
    RESOURCE_COMMANDS,
    add_resource_commands,
    discovered_rows,
    estimated,
    hf_cached_repo,
    run_resource_command,
)
from llmlab_fixtures.cli.report import add_report_parser, run_report
from llmlab_fixtures.errors import LlmlabError
from llmlab_fixtures.models.files import resolve_gguf, ways_to_get
from llmlab_fixtures.models.registry import ModelEntry, load_models
from llmlab_fixtures.models.resources import entry_memory_estimate, entry_weights_size
from llmlab_fixtures.reports.table import format_size, text_grid


def _params(n: int | None) -> str:
    return "-" if not n else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _downloadable(entry: ModelEntry) -> str:
    ways = ways_to_get(entry)
    return f"downloadable: {ways[0].split(' (')[0]}" if ways else "no source registered"


def model_row(entry: ModelEntry, model_dirs: tuple[Path, ...] = ()) -> dict[str, str]:
    """One line of ``llmlab models``: metadata, and where the model is (or how to get it)."""
    where, memory = "", "-"
    if entry.gguf:
        try:
            path = resolve_gguf(entry, entry.alias, model_dirs)
        except LlmlabError:
            where = _downloadable(entry)
        else:
            from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

            where = f"available: {path}"
            memory = format_size(LlamaCppProvider(path, entry.alias, n_ctx=4096).estimate_memory())
    elif entry.cloud_backends:
        where = f"cloud API ({', '.join(entry.cloud_backends)})"
    else:
        where = _downloadable(entry)
    if where.startswith("downloadable") and entry.transformers and (cached := hf_cached_repo(entry)) is not None:
        where = f"available (transformers): {cached}"
    if memory == "-" and entry.local_backends:
        memory = estimated(entry_memory_estimate(entry))
    return {
        "alias": entry.alias,
        "params": _params(entry.parameters),
        "quant": entry.quantization or "-",
        "size": format_size(entry.file_size) if entry.file_size else estimated(entry_weights_size(entry)),
        "ctx": str(entry.context_length or "-"),
        "memory@4k": memory,
        "sources": ",".join(entry.backends) or "-",
        "license": entry.license or "-",
        "where": where,
    }


def list_models(model_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The ``llmlab models`` table as lines of text."""
    models = load_models((Path("llmlab.toml"), Path("pyproject.toml")))
    rows = [model_row(entry, model_dirs) for entry in models.values()]
    rows += discovered_rows(models, model_dirs)
    header = list(rows[0])
    return text_grid(header, [[r[h] for h in header] for r in rows], markdown=False, rule=False)


def list_ollama_models(host: str | None = None) -> list[str]:
    """Models pulled into the Ollama server at ``host`` (default $OLLAMA_HOST), or one line saying it is not running."""
    from llmlab_fixtures.providers.ollama import list_pulled_models, resolve_host

    try:
        pulled = list_pulled_models(host)
    except LlmlabError as exc:
        return [f"Ollama: {exc}"]
    url = resolve_host(host)
    if not pulled:
        return [f"Ollama at {url}: no models pulled (ollama pull <tag>)"]
    rows = [[f"ollama:{m['name']}", m.get("parameter_size") or "-", m.get("quantization_level") or "-",
             format_size(m.get("size")), m.get("family") or "-"] for m in pulled]
    return [f"Ollama at {url}:", *text_grid(["spec", "params", "quant", "size", "family"], rows, markdown=False,
                                             rule=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmlab", description="llmlab: benchmark local and cloud language models")
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", help="list registered models and whether they can run here")
    models.add_argument("--model-dir", action="append", default=[], type=Path, help="a directory with GGUF files")
    add_resource_commands(commands)
    add_report_parser(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "models":
            print("\n".join(list_models(tuple(args.model_dir))))
            print()
            print("\n".join(list_ollama_models()))
        elif args.command in RESOURCE_COMMANDS:
            return run_resource_command(args)
        elif args.command == "report":
            return run_report(args)
    except LlmlabError as exc:
        print(f"llmlab: {exc}", file=sys.stderr)
        return 2
    return 0

