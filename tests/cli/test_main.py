"""`llmlab models`: what a user sees about every registered model on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.testing.ollama_server import running_ollama_server


def _run_models(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", "models", *args], capture_output=True,
                          text=True, timeout=120, check=True, env={**os.environ, **(env or {})})
    return done.stdout


def _models(*args: str) -> dict[str, str]:
    registry = _run_models(*args).split("\n\n")[0]
    return {line.split()[0]: line for line in registry.splitlines()[1:]}


def test_models_pulled_into_ollama_are_listed() -> None:
    with running_ollama_server({"smollm2:135m": embedded_gguf(SMOLLM2)}) as url:
        out = _run_models(env={"OLLAMA_HOST": url})
    ollama = out.split("\n\n")[1].splitlines()
    assert ollama[0] == f"Ollama at {url}:"
    assert ollama[1].split() == ["spec", "params", "quant", "size", "family"]
    assert ollama[2].split()[:3] == ["ollama:smollm2:135m", "134.52M", "Q4_1"]


def test_an_ollama_that_is_not_running_is_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = _run_models(env={"OLLAMA_HOST": f"127.0.0.1:{port}"})
    assert out.rstrip().splitlines()[-1] == (f"Ollama: cannot reach Ollama at http://127.0.0.1:{port}: start it "
                                             "with `ollama serve` (or set OLLAMA_HOST)")


def test_embedded_models_are_available_and_the_rest_downloadable() -> None:
    rows = _models()
    assert "available: " in rows["smollm2-135m"] and "Q4_1" in rows["smollm2-135m"]
    assert "available: " in rows["gemma3-270m"] and "MiB" in rows["gemma3-270m"].split("available")[0]
    for alias in ("pythia-70m", "pythia-160m", "smollm-135m", "smollm-360m", "qwen-0.5b", "llama3.2-1b", "gpt-oss-20b"):
        assert f"downloadable: `llmlab download {alias}`" in rows[alias], rows[alias]
        size, memory = rows[alias].split()[3], rows[alias].split()[6]
        assert size != "-" and memory.startswith("~"), rows[alias]
    assert rows["gpt-4o-mini"].endswith("cloud API (openai)")


def test_a_gguf_dropped_in_a_model_dir_appears(tmp_path: Path) -> None:
    (tmp_path / "qwen2.5-0.5b-instruct-q4_k_m.gguf").symlink_to(embedded_gguf(SMOLLM2))
    row = _models("--model-dir", str(tmp_path))["qwen-0.5b"]
    assert f"available: {tmp_path / 'qwen2.5-0.5b-instruct-q4_k_m.gguf'}" in row
