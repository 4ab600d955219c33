"""`llmlab models`: what a user sees about every registered model on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmlab_fixtures.embedded import SMOLLM2, embedded_gguf


def _models(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", "models", *args], capture_output=True,
                          text=True, timeout=120, check=True)
    return {line.split()[0]: line for line in done.stdout.splitlines()[1:]}


def test_embedded_models_are_available_and_the_rest_downloadable() -> None:
    rows = _models()
    assert "available: " in rows["smollm2-135m"] and "Q4_1" in rows["smollm2-135m"]
    assert "available: " in rows["gemma3-270m"] and "MiB" in rows["gemma3-270m"].split("available")[0]
    for alias in ("pythia-70m", "pythia-160m", "smollm-135m", "smollm-360m", "qwen-0.5b", "llama3.2-1b", "gpt-oss-20b"):
        assert "downloadable: `huggingface-cli download" in rows[alias], rows[alias]
    assert rows["gpt-4o-mini"].endswith("cloud API (openai)")


def test_a_gguf_dropped_in_a_model_dir_appears(tmp_path: Path) -> None:
    (tmp_path / "qwen2.5-0.5b-instruct-q4_k_m.gguf").symlink_to(embedded_gguf(SMOLLM2))
    row = _models("--model-dir", str(tmp_path))["qwen-0.5b"]
    assert f"available: {tmp_path / 'qwen2.5-0.5b-instruct-q4_k_m.gguf'}" in row
