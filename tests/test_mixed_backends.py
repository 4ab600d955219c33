"""One run, every backend: llama.cpp and transformers in-process, Ollama and an OpenAI-compatible server on
loopback, a cloud API (Anthropic's wire format on loopback) — and models that cannot run, reported one line each."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.testing.anthropic_server import running_anthropic_server
from llmlab_fixtures.testing.ollama_server import running_ollama_server
from llmlab_fixtures.testing.openai_server import running_llama_cpp_openai_server

pytest.importorskip("transformers")
pytest.importorskip("anthropic")

DATASETS = ("arc_challenge", "arc_easy", "gsm8k", "hellaswag", "mmlu", "truthfulqa_mc1")


@pytest.fixture(scope="module")
def ollama_url() -> Iterator[str]:
    with running_ollama_server({"smollm2:135m": embedded_gguf(SMOLLM2)}, num_thread=1) as url:
        yield url


@pytest.fixture(scope="module")
def openai_compat_url() -> Iterator[str]:
    with running_llama_cpp_openai_server(embedded_gguf(SMOLLM2), "smollm2") as url:
        yield url


@pytest.fixture
def anthropic_url() -> Iterator[str]:
    with running_anthropic_server() as server:
        yield server.base_url


@pytest.fixture
def no_cloud_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_BASE_URL",
                 "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_backend_in_one_table(bench_pytester: pytest.Pytester, data_dir: Path, ollama_url: str,
                                    openai_compat_url: str, anthropic_url: str, no_cloud_keys: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", ollama_url)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
    compat = f"openai-compat:{openai_compat_url}#smollm2"
    models = ["local:smollm2-135m", "transformers:smollm2-135m", "ollama:smollm2:135m", compat, "claude-3-haiku",
              "gpt-4o-mini"]
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        f"--models={','.join(models)}", "--limit=2", f"--data-dir={data_dir}", f"--output-dir={out}", "-n", "2",
        "-p", "no:cacheprovider", "--no-checkpoint", "-rs",
    )
    labels = ["llama-cpp:smollm2-135m", "transformers:smollm2-135m", "ollama:smollm2:135m", "openai-compat:smollm2",
              "claude-3-haiku"]
    # one table, generation scoring for all (Ollama and the APIs return no prompt log-probabilities): mc2 skipped
    result.assert_outcomes(passed=len(labels) * len(DATASETS), skipped=len(labels))
    assert result.ret == pytest.ExitCode.OK  # a missing key skips that model; it is not an error
    key_line = ("skipped gpt-4o-mini: model gpt-4o-mini: OPENAI_API_KEY is not set; export it (or drop the model) "
                "— the other models still run")
    ollama_port = ollama_url.rsplit(":", 1)[1]
    compat_port = openai_compat_url.split(":")[2].split("/")[0]
    anthropic_port = anthropic_url.rsplit(":", 1)[1].rstrip("/")
    result.stdout.fnmatch_lines([
        f"llmlab: {key_line}",
        "*llmlab comparison (generate scoring)*",
        "dataset (metric)*" + "*".join(labels),
        *(f"{dataset} (*" for dataset in DATASETS),
        f"data sent to*in-process*in-process*loopback 127.0.0.1:{ollama_port}*loopback 127.0.0.1:{compat_port}"
        f"*loopback 127.0.0.1:{anthropic_port}",
        f"note: {key_line}",
    ])
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == labels
    assert {(s["model"], s["dataset"]) for s in results["summary"]} == {(m, d) for m in labels for d in DATASETS}
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == len(labels) * len(DATASETS) * 2
    assert all(item["error"] is None for item in items), [i["error"] for i in items if i["error"]]
    by_model = {label: [i for i in items if i["model"] == label] for label in labels}
    # the same GGUF through llama.cpp in-process, Ollama and llama-cpp-python's server: the same greedy replies
    for other in ("ollama:smollm2:135m", "openai-compat:smollm2"):
        assert [i["response"] for i in by_model[other]] == [i["response"] for i in by_model[labels[0]]]


@pytest.mark.parametrize("problem", ["dead server", "not pulled"])
def test_an_ollama_problem_is_one_line_and_the_other_model_still_runs(
        bench_pytester: pytest.Pytester, data_dir: Path, ollama_url: str, monkeypatch: pytest.MonkeyPatch,
        problem: str) -> None:
    if problem == "dead server":
        host, tag = f"127.0.0.1:{_closed_port()}", "smollm2:135m"
        line = f"cannot reach Ollama at http://{host}: start it with `ollama serve` (or set OLLAMA_HOST)"
    else:
        host, tag = ollama_url, "llama3.2:1b"
        line = "Ollama model llama3.2:1b is not pulled: run `ollama pull llama3.2:1b`"
    monkeypatch.setenv("OLLAMA_HOST", host)
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", f"--models=local:smollm2-135m,ollama:{tag}", "--limit=2", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider", "--no-checkpoint",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines([f"llmlab: skipped ollama:{tag}: *{line}*", "*llama-cpp:smollm2-135m*",
                                 f"note: skipped ollama:{tag}: *{line}*"])
    assert [s["model"] for s in json.loads((out / "results.json").read_text())["summary"]] == \
        ["llama-cpp:smollm2-135m"]
