"""`llmlab download` against a loopback stand-in for the Hugging Face Hub: download, resume, checksum failure, and
what an offline or unreachable Hub looks like. Each command runs in a subprocess with its own HF_HOME."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.testing.hub_server import COMMIT, HubState, running_hub_server

REPO = "test-org/SmolLM2-135M-GGUF"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OTHER_FILE = "SmolLM2-135M-Instruct.Q8_0.gguf"  # the same bytes under a second name, to test --quantization

USER_MODELS = f"""
[models.tiny]
display_name = "SmolLM2 from the loopback Hub"
quantization = "Q4_1"
gguf = {{ repo = "{REPO}", file = "{DEFAULT_FILE}", quantizations = {{ Q8_0 = "{OTHER_FILE}" }} }}

[models.pythia-like]
transformers = {{ repo = "test-org/not-here" }}
"""


@pytest.fixture(scope="module")
def model_file() -> Path:
    return embedded_gguf(SMOLLM2)


@pytest.fixture
def hub(model_file: Path) -> Iterator[HubState]:
    with running_hub_server() as state:
        state.add(REPO, DEFAULT_FILE, model_file)
        state.add(REPO, OTHER_FILE, model_file)
        yield state


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "llmlab.toml").write_text(USER_MODELS)
    return tmp_path


def _env(workdir: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_HOME": str(workdir / "hf"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                "LLMLAB_CACHE_DIR": str(workdir / "llmlab-cache"), **extra})
    return env


def llmlab(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(workdir: Path, filename: str) -> Path:
    return workdir / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / filename


def test_download_lands_in_the_hf_cache_verified(hub: HubState, workdir: Path, model_file: Path) -> None:
    env = _env(workdir, hub.base_url)
    done = llmlab(workdir, env, "download", "tiny")
    assert done.returncode == 0, done.stderr
    target = _cached(workdir, DEFAULT_FILE)
    assert done.stdout.strip() == (f"downloaded {target} (94 MiB, sha256 {_sha256(model_file)[:12]}… verified)")
    assert "100%" in done.stderr  # the progress bar
    assert target.is_symlink() and _sha256(target) == _sha256(model_file)
    assert (target.parent.parent.parent / "refs" / "main").read_text() == COMMIT
    heads = hub.file_requests("HEAD")
    assert [r.path for r in heads] == [f"/{REPO}/resolve/main/{DEFAULT_FILE}"]
    # huggingface_hub finds it afterwards (so resolve_gguf does), and llmlab models shows it as available
    find = subprocess.run([sys.executable, "-c", f"from huggingface_hub import try_to_load_from_cache as f; "
                                                 f"print(f('{REPO}', '{DEFAULT_FILE}'))"],
                          env=env, capture_output=True, text=True, check=True)
    assert find.stdout.strip() == str(target)
    models = llmlab(workdir, env, "models")
    row = next(line for line in models.stdout.splitlines() if line.startswith("tiny "))
    assert f"available: {target}" in row
    again = llmlab(workdir, env, "download", "tiny")
    assert again.stdout.strip() == f"already downloaded: {target} (94 MiB)"
    assert len(hub.file_requests("GET")) == 1  # nothing fetched twice


def test_an_interrupted_download_resumes_with_a_range_request(hub: HubState, workdir: Path,
                                                              model_file: Path) -> None:
    env = _env(workdir, hub.base_url)
    cut = 40 << 20
    hub.drop_after = cut
    first = llmlab(workdir, env, "download", "tiny", "--no-progress")
    assert first.returncode == 2
    assert first.stderr.strip() == (f"llmlab: download of {DEFAULT_FILE} interrupted after 40 MiB of 94 MiB "
                                    "(RemoteProtocolError); run the same command again to resume")
    blobs = workdir / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    partial = blobs / f"{_sha256(model_file)}.incomplete"
    assert partial.stat().st_size == cut
    second = llmlab(workdir, env, "download", "tiny", "--no-progress")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().endswith("verified, resumed at 40 MiB)")
    gets = hub.file_requests("GET")
    assert [r.headers.get("range") for r in gets] == [None, f"bytes={cut}-"]
    assert _sha256(_cached(workdir, DEFAULT_FILE)) == _sha256(model_file)
    assert not partial.exists()


def test_a_corrupted_download_is_rejected_and_deleted(hub: HubState, workdir: Path, model_file: Path) -> None:
    env = _env(workdir, hub.base_url)
    hub.corrupt.add(OTHER_FILE)
    done = llmlab(workdir, env, "download", "tiny", "--quantization", "Q8_0", "--no-progress")
    assert done.returncode == 2
    expected = _sha256(model_file)
    line = done.stderr.strip()
    assert line.startswith(f"llmlab: {OTHER_FILE} failed verification: sha256 ")
    assert line.endswith(f"but the Hub reports {expected[:12]}…; the corrupted file was deleted, run the command "
                         "again")
    blobs = workdir / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert list(blobs.iterdir()) == []
    assert not _cached(workdir, OTHER_FILE).exists()
    hub.corrupt.clear()  # the next try gets good bytes
    again = llmlab(workdir, env, "download", "tiny", "--quantization", "q8_0", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _sha256(_cached(workdir, OTHER_FILE)) == expected


def test_an_unknown_quantization_lists_the_ones_that_exist(hub: HubState, workdir: Path) -> None:
    done = llmlab(workdir, _env(workdir, hub.base_url), "download", "tiny", "--quantization", "Q2_K")
    assert done.returncode == 2
    assert done.stderr.strip() == "llmlab: model 'tiny' has no Q2_K GGUF; available: Q4_1, Q8_0"
    assert hub.requests == []


def test_offline_mode_is_one_line(workdir: Path) -> None:
    done = llmlab(workdir, _env(workdir, "http://127.0.0.1:9", HF_HUB_OFFLINE="1"), "download", "tiny")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "llmlab: the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to download, or copy "
        "the file into a directory given with --model-dir / LLMLAB_MODEL_DIRS")


def test_an_unreachable_hub_is_one_line(workdir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = llmlab(workdir, _env(workdir, f"http://127.0.0.1:{port}"), "download", "tiny")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"llmlab: cannot reach the Hugging Face Hub at http://127.0.0.1:{port} (")
    assert lines[0].endswith("check the network, HF_ENDPOINT and proxy settings, or set HF_HUB_OFFLINE=1 to use "
                             "only cached models")


def test_unknown_alias_and_a_model_with_nothing_to_download(hub: HubState, workdir: Path) -> None:
    env = _env(workdir, hub.base_url)
    done = llmlab(workdir, env, "download", "tinny")
    assert done.stderr.strip() == ("llmlab: unknown model 'tinny' (did you mean tiny?); `llmlab models` lists "
                                   "the aliases")
    done = llmlab(workdir, env, "download", "gpt-4o-mini")
    assert done.returncode == 2
    assert done.stderr.strip() == ("llmlab: model 'gpt-4o-mini' has nothing to download from the Hugging Face Hub "
                                   "(its backends: openai)")


def test_a_transformers_repo_is_downloaded_as_a_snapshot(hub: HubState, workdir: Path) -> None:
    repo = workdir / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "gpt_neox"}')
    (repo / "model.safetensors").write_bytes(embedded_gguf(SMOLLM2).read_bytes()[: 1 << 20])
    for name in ("config.json", "model.safetensors"):
        hub.add("test-org/not-here", name, repo / name)
    env = _env(workdir, hub.base_url)
    done = llmlab(workdir, env, "download", "pythia-like", "--no-progress")
    assert done.returncode == 0, done.stderr
    snapshot = workdir / "hf" / "hub" / "models--test-org--not-here" / "snapshots" / COMMIT
    assert done.stdout.strip() == f"downloaded {snapshot} (2 files, 1 MiB, by snapshot_download)"
    assert (snapshot / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    row = next(line for line in llmlab(workdir, env, "models").stdout.splitlines() if line.startswith("pythia-like"))
    assert row.endswith(f"available (transformers): {snapshot}")
