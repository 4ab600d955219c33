"""`llmlab models` discovery beyond the registry, and `llmlab cache list|remove` on real cache folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.testing.hub_server import HubState, running_hub_server

REPO_ID = "test-org/SmolLM2-135M-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
USER_MODELS = f"""
[models.tiny]
quantization = "Q4_1"
gguf = {{ repo = "{REPO_ID}", file = "{FILE}" }}
"""


def llmlab(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.split("\n\n")[0].splitlines()[1:]}


@pytest.fixture
def hub() -> Iterator[HubState]:
    with running_hub_server() as state:
        state.add(REPO_ID, FILE, embedded_gguf(SMOLLM2))
        yield state


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "llmlab.toml").write_text(USER_MODELS)
    return tmp_path


def _env(workdir: Path, endpoint: str = "http://127.0.0.1:9") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "LLMLAB_"))}
    env.update({"HF_HOME": str(workdir / "hf"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                "LLMLAB_CACHE_DIR": str(workdir / "llmlab-cache"), "OLLAMA_HOST": "127.0.0.1:9"})
    return env


def test_an_unregistered_gguf_in_a_model_dir_is_listed_with_its_header(workdir: Path) -> None:
    models = workdir / "models"
    models.mkdir()
    (models / "my-own-model.gguf").symlink_to(embedded_gguf(SMOLLM2))
    env = {**_env(workdir), "LLMLAB_MODEL_DIRS": str(models)}
    row = _rows(llmlab(workdir, env, "models").stdout)[f"llama-cpp:{models / 'my-own-model.gguf'}"]
    assert row.split()[1:8] == ["135M", "Q4_1", "94", "MiB", "8192", "452", "MiB"]
    assert row.endswith("available: model dir (unregistered)")


def test_cache_list_and_remove(hub: HubState, workdir: Path) -> None:
    env = _env(workdir, hub.base_url)
    assert llmlab(workdir, env, "cache", "list").stdout.strip() == \
        "no cached models (llmlab download <alias> fetches one)"
    assert llmlab(workdir, env, "download", "tiny", "--no-progress").returncode == 0
    assembled = workdir / "llmlab-cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assembled.parent.mkdir(parents=True)
    assembled.symlink_to(embedded_gguf(SMOLLM2))  # stands in for the assembled Gemma file (same layout)
    listing = llmlab(workdir, env, "cache", "list").stdout.splitlines()
    repo_path = workdir / "hf" / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    assert listing[0].split() == ["cache", "name", "size", "aliases", "weights", "path"]
    assert listing[1].split() == ["hf", REPO_ID, "94", "MiB", "tiny", FILE, str(repo_path)]
    assert listing[2].split() == ["llmlab", assembled.name, "94", "MiB", "gemma3-270m", assembled.name,
                                  str(assembled)]
    assert listing[3] == "total 188 MiB"

    asked = llmlab(workdir, env, "cache", "remove", "tiny")
    assert asked.returncode == 1
    assert asked.stdout.strip() == f"would remove {REPO_ID} (94 MiB): {repo_path}"
    assert asked.stderr.strip() == "nothing deleted; add --yes to delete"
    assert repo_path.is_dir()

    missing = llmlab(workdir, env, "cache", "remove", "qwen-0.5b", "--yes")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (f"llmlab: nothing cached matches 'qwen-0.5b'; cached: {assembled.name}, "
                                      f"gemma3-270m, {REPO_ID}, tiny (see `llmlab cache list`)")

    done = llmlab(workdir, env, "cache", "remove", "tiny", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"removing {REPO_ID} (94 MiB): {repo_path}", "freed 94 MiB"]
    assert not repo_path.exists()
    assert "downloadable: `llmlab download tiny`" in _rows(llmlab(workdir, env, "models").stdout)["tiny"]

    by_path = llmlab(workdir, env, "cache", "remove", str(assembled), "--yes")
    assert by_path.returncode == 0, by_path.stderr
    assert not assembled.is_symlink() and embedded_gguf(SMOLLM2).is_file()  # the link went, not its target


def test_remove_by_repo_id(hub: HubState, workdir: Path) -> None:
    env = _env(workdir, hub.base_url)
    assert llmlab(workdir, env, "download", "tiny", "--no-progress").returncode == 0
    done = llmlab(workdir, env, "cache", "remove", REPO_ID, "--yes")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "freed 94 MiB"
    assert llmlab(workdir, env, "cache", "list").stdout.startswith("no cached models")
