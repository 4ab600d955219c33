"""The saved transformers conversion of a GGUF: the second load reads it and scores exactly as the first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from llmlab_fixtures.eval.prompts import loglikelihood_requests
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import parse_spec
from llmlab_fixtures.providers import BackendSettings
from llmlab_fixtures.providers.transformers.gguf_conversion import GgufConversion
from llmlab_fixtures.providers.transformers.provider import make_provider
from llmlab_fixtures.run.worker import default_threads
from llmlab_fixtures.tasks import get_task

SETTINGS = BackendSettings(threads=default_threads(), device="cpu")


def _provider() -> object:
    return make_provider(parse_spec("transformers:smollm2-135m", builtin_models()), SETTINGS)


def _llmlab(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMLAB_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_second_load_reads_the_saved_conversion_and_scores_identically(tmp_path: Path, data_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LLMLAB_CONVERSION_CACHE", raising=False)
    task = get_task("arc_challenge")
    from llmlab_fixtures.eval.datasets import load_docs

    requests = [r for doc in load_docs(task, data_dir)[:6] for r in loglikelihood_requests(task, doc)]
    texts = [r.context + r.continuation for r in requests] + ["<|im_start|>user\nhi<|im_end|>", "", " x\n\n"]
    conversion = GgufConversion.for_file(embedded_gguf(SMOLLM2), tmp_path)
    runs = []
    for run in range(3):
        if run == 2:  # a damaged save (say, a disk that filled up under another program) is converted again
            weights = next(conversion.root.glob("model-float32/*.safetensors"))
            weights.write_bytes(weights.read_bytes()[: 1 << 20])
        provider = _provider()
        provider.initialize()
        runs.append((provider.get_model_info().extra["gguf_conversion"],
                     [provider.tokenize(t) for t in texts], provider.add_bos,
                     [r.logprob for r in provider.loglikelihood(requests)]))
        provider.close()
    assert [r[0] for r in runs] == ["converted now", "loaded saved", "converted now"]
    assert runs[0][1:] == runs[1][1:] == runs[2][1:]  # token ids, add_bos and log-likelihoods, bit for bit
    assert runs[0][2] is False  # SmolLM2's GGUF says add_bos_token = false

    assert conversion.tokenizer_dir() and conversion.model_dir("float32")
    assert not list(conversion.root.glob(".*partial"))

    listing = _llmlab("cache", "list", cache=tmp_path)
    row = next(line for line in listing.stdout.splitlines() if line.startswith("converted"))
    assert row.split()[1] == conversion.root.name and "model-float32/model.safetensors" in row
    removed = _llmlab("cache", "remove", conversion.root.name, "--yes", cache=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert not conversion.root.exists()


def test_a_changed_gguf_or_a_crashed_save_is_not_read(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf(SMOLLM2), gguf)
    first = GgufConversion.for_file(gguf, tmp_path / "cache")
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert GgufConversion.for_file(gguf, tmp_path / "cache").root != first.root

    partial = first.root / ".model-float32.123.partial"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    (first.root / "model-float32").mkdir()
    (first.root / "model-float32" / "config.json").write_text("{}")  # weights never written
    assert first.model_dir("float32") is None and first.tokenizer_dir() is None


def test_a_new_conversion_removes_those_of_changed_ggufs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reinstalled package (same path, new mtime) must not leave its old 500 MB conversion behind."""
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMLAB_CONVERSION_CACHE", raising=False)
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    for copy in (first, second):
        shutil.copyfile(embedded_gguf(SMOLLM2), copy)

    def convert(gguf: Path) -> Path:
        provider = make_provider(parse_spec(f"transformers:{gguf}", builtin_models()), SETTINGS)
        provider.load_tokenizer()
        provider.close()
        return GgufConversion.for_file(gguf).root

    old_first, kept = convert(first), convert(second)
    assert old_first.is_dir() and kept.is_dir()  # both GGUFs are as they were converted
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))  # "reinstalled"
    new_first = convert(first)
    assert new_first != old_first and new_first.is_dir() and kept.is_dir()
    assert not old_first.exists()


def test_cache_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMLAB_CONVERSION_CACHE", "0")
    provider = _provider()
    provider.load_tokenizer()
    assert provider.tokenize("hello") and not (tmp_path / "converted").exists()
    provider.close()
