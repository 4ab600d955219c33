"""The Ollama backend and the loopback Ollama server, driven through the official ``ollama`` client (unmodified).

With ``OLLAMA_HOST`` set these tests run against that real Ollama (model tag from ``LLMLAB_TEST_OLLAMA_MODEL``,
default ``smollm2:135m``); otherwise they start the loopback server on the embedded SmolLM2. Fault injection and
comparisons with the in-process model only make sense on the loopback server and skip on a real one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

ollama = pytest.importorskip("ollama")
pytest.importorskip("llama_cpp")

from llmlab_fixtures.errors import LlmlabError, ModelUnavailable  # noqa: E402
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf  # noqa: E402
from llmlab_fixtures.models.specs import ModelSpec  # noqa: E402
from llmlab_fixtures.providers import BackendSettings  # noqa: E402
from llmlab_fixtures.providers import ollama as backend  # noqa: E402
from llmlab_fixtures.providers.base import GenerationRequest, LoglikelihoodRequest, LoglikelihoodUnsupported  # noqa: E402
from llmlab_fixtures.run.network import data_location  # noqa: E402
from llmlab_fixtures.testing.ollama_server import (  # noqa: E402
    OllamaServer,
    human_number,
    parse_go_duration,
    parse_keep_alive,
    running_ollama_server,
)

REAL_HOST = os.environ.get("OLLAMA_HOST") or None
TAG = os.environ.get("LLMLAB_TEST_OLLAMA_MODEL", "smollm2:135m") if REAL_HOST else "smollm2:135m"
MISSING = "llmlab-no-such-model:0b"
PROMPT = "The capital of France is"
TIMEOUT = 300.0  # a loaded 2-core machine can take seconds per token


@dataclass
class Target:
    """The server under test: its URL, the model tag, and the loopback server object (None for a real Ollama)."""

    url: str
    tag: str
    server: OllamaServer | None


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return embedded_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def target(smollm_path: Path) -> Iterator[Target]:
    if REAL_HOST:
        yield Target(backend.resolve_host(REAL_HOST), TAG, None)
        return
    # one thread and the provider's context length: client calls and the provider never force a reload
    models = {"smollm2:135m": smollm_path, "tiny-smollm": smollm_path}
    with OllamaServer(models, num_ctx=8192, num_thread=1) as server:
        yield Target(server.url, "smollm2:135m", server)


@pytest.fixture(autouse=True)
def _ollama_host(monkeypatch: pytest.MonkeyPatch, target: Target) -> None:
    monkeypatch.setenv("OLLAMA_HOST", target.url)


@pytest.fixture
def loopback(target: Target) -> OllamaServer:
    if target.server is None:
        pytest.skip("needs the loopback server (fault injection / in-process comparison); OLLAMA_HOST is set")
    return target.server


@pytest.fixture
def client(target: Target) -> Iterator[ollama.Client]:
    with ollama.Client(timeout=TIMEOUT) as c:  # host from OLLAMA_HOST, as users run it
        yield c


def settings(**kwargs: object) -> BackendSettings:
    return BackendSettings(threads=1, request_timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


def spec(tag: str) -> ModelSpec:
    return ModelSpec(f"ollama:{tag}", "ollama", tag)


@pytest.fixture(scope="module")
def provider(target: Target) -> Iterator[backend.OllamaProvider]:
    with backend.OllamaProvider(target.tag, f"ollama:{target.tag}", host=target.url, threads=1,
                                request_timeout=TIMEOUT) as p:
        yield p


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loaded(client: ollama.Client) -> list[str]:
    return [m.model for m in client.ps().models]


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


# --- pure helpers ------------------------------------------------------------------------------------------------


def test_go_durations_and_keep_alive() -> None:
    assert parse_go_duration("5m") == 300 and parse_go_duration("1h30m") == 5400
    assert parse_go_duration("300ms") == pytest.approx(0.3) and parse_go_duration("0") == 0
    assert parse_go_duration("-1s") == -1 and parse_go_duration("1.5h") == 5400
    with pytest.raises(ValueError, match='missing unit in duration "300"'):
        parse_go_duration("300")
    assert parse_keep_alive(None, 300) == 300 and parse_keep_alive(0, 300) == 0 and parse_keep_alive(30, 1) == 30
    assert parse_keep_alive("10s", 300) == 10 and parse_keep_alive(-1, 300) > 1e9


def test_names_and_parameter_sizes() -> None:
    assert backend.normalize_tag("smollm2") == "smollm2:latest" == backend.normalize_tag("SmolLM2:latest")
    assert backend.normalize_tag("registry.ollama.ai/library/qwen2.5:0.5b") == "qwen2.5:0.5b"
    assert backend.normalize_tag("user/model") == "user/model:latest"
    assert human_number(134515008) == "134.52M" and human_number(8030261248) == "8.0B"
    assert human_number(7_000_000_000) == "7B" and human_number(268_098_176) == "268.10M"


def test_host_resolves_like_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_HOST")
    assert backend.resolve_host() == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", ":5555")
    assert backend.resolve_host() == "http://127.0.0.1:5555"
    assert backend.resolve_host("0.0.0.0") == "http://0.0.0.0:11434"
    assert data_location(backend.resolve_host()) == "loopback 127.0.0.1:5555"
    assert data_location(backend.resolve_host("https://ollama.example.com")) == "cloud ollama.example.com"


# --- the REST API through the official client --------------------------------------------------------------------


def test_root_head_and_version(target: Target) -> None:
    assert httpx.get(target.url).text == "Ollama is running"
    assert httpx.head(target.url).status_code == 200
    assert isinstance(httpx.get(f"{target.url}/api/version").json()["version"], str)


def test_tags_list_the_model(client: ollama.Client, target: Target, smollm_path: Path) -> None:
    models = {m.model: m for m in client.list().models}
    assert target.tag in models, sorted(models)
    model = models[target.tag]
    assert re.fullmatch(r"[0-9a-f]{64}", model.digest or "")
    assert model.size and model.size > 0 and model.modified_at is not None
    assert model.details is not None and model.details.format == "gguf" and model.details.family
    if target.server is not None:
        assert model.digest == hashlib.sha256(smollm_path.read_bytes()).hexdigest()
        assert model.size == smollm_path.stat().st_size
        assert (model.details.parameter_size, model.details.quantization_level) == ("134.52M", "Q4_1")
        assert models["tiny-smollm:latest"].digest == model.digest  # a tag given without ":..." is ":latest"


def test_show_parses_with_the_client(client: ollama.Client, target: Target) -> None:
    shown = client.show(target.tag)
    info = shown.modelinfo
    assert info is not None
    arch = info["general.architecture"]
    assert isinstance(info[f"{arch}.context_length"], int) and info["general.parameter_count"] > 0
    assert "completion" in (shown.capabilities or [])
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modified_at is not None and isinstance(shown.modelfile, str)
    assert "tokenizer.chat_template" not in info and "general.name" not in info
    older = httpx.post(f"{target.url}/api/show", json={"name": target.tag}, timeout=TIMEOUT)  # the older field name
    assert older.status_code == 200 and older.json()["model_info"]["general.architecture"] == arch


def test_generate_non_streaming(client: ollama.Client, target: Target) -> None:
    r = client.generate(target.tag, PROMPT, raw=True, options={"temperature": 0, "num_predict": 6, "seed": 1})
    assert r.done and r.done_reason in ("stop", "length") and isinstance(r.response, str) and r.response
    assert r.model == target.tag and r.created_at
    for name in ("prompt_eval_count", "eval_count", "prompt_eval_duration", "total_duration"):
        assert isinstance(getattr(r, name), int) and getattr(r, name) > 0, name
    assert isinstance(r.eval_duration, int) and isinstance(r.load_duration, int)
    assert r.total_duration >= r.prompt_eval_duration
    assert 1 <= r.eval_count <= 6 + 1


def test_generate_streaming_equals_non_streaming(client: ollama.Client, target: Target) -> None:
    options = {"temperature": 0, "num_predict": 6, "seed": 1}
    chunks = list(client.generate(target.tag, PROMPT, raw=True, stream=True, options=options))
    *body, last = chunks
    assert body and all(not c.done and c.eval_count is None for c in body)
    assert last.done and last.response == "" and last.eval_count and last.eval_duration is not None
    datetime.fromisoformat(last.created_at.replace("Z", "+00:00"))  # RFC 3339
    whole = client.generate(target.tag, PROMPT, raw=True, options=options).response
    assert "".join(c.response for c in chunks) == whole


def test_generate_applies_the_template_and_returns_context(client: ollama.Client, target: Target) -> None:
    r = client.generate(target.tag, "Say hello.", system="Answer in one word.",
                        options={"temperature": 0, "num_predict": 4})
    assert r.done and isinstance(r.context, list) and r.context
    bare = client.generate(target.tag, "Say hello.", raw=True, options={"temperature": 0, "num_predict": 1})
    assert r.prompt_eval_count > bare.prompt_eval_count  # the chat template wrapped the prompt


def test_chat_streaming_and_not(client: ollama.Client, target: Target) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    options = {"temperature": 0, "num_predict": 5}
    whole = client.chat(target.tag, messages=messages, options=options)
    assert whole.done and whole.message.role == "assistant" and isinstance(whole.message.content, str)
    chunks = list(client.chat(target.tag, messages=messages, options=options, stream=True))
    assert chunks[-1].done and chunks[-1].eval_count
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content


def test_ps_after_a_load_and_after_keep_alive_zero(client: ollama.Client, target: Target) -> None:
    load = client.generate(target.tag, keep_alive="5m")
    assert load.done and load.done_reason == "load"
    running = {m.model: m for m in client.ps().models}
    assert target.tag in running
    model = running[target.tag]
    assert model.expires_at is not None and model.expires_at > datetime.now(timezone.utc)
    assert model.size and model.size > 0
    if target.server is not None:
        assert model.size_vram == 0 and model.context_length == 8192
    unload = client.generate(target.tag, keep_alive=0)
    assert unload.done_reason == "unload"
    assert wait_until(lambda: target.tag not in loaded(client)), loaded(client)


def test_keep_alive_runs_out(client: ollama.Client, target: Target, loopback: OllamaServer) -> None:
    client.generate(target.tag, PROMPT, raw=True, keep_alive="1s", options={"temperature": 0, "num_predict": 1})
    assert target.tag in loaded(client)
    assert wait_until(lambda: target.tag not in loaded(client), timeout=10)


def test_pull_known_and_unknown(client: ollama.Client, target: Target, loopback: OllamaServer) -> None:
    """Loopback only: a real Ollama asks registry.ollama.ai, which needs the internet."""
    statuses = [p.status for p in client.pull(target.tag, stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    assert client.pull(target.tag).status == "success"
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull(MISSING, stream=True))
    with pytest.raises(ollama.ResponseError, match="file does not exist") as info:
        client.pull(MISSING)
    assert info.value.status_code == 500


def test_unknown_model_is_a_404(client: ollama.Client, target: Target) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(MISSING, "hi")
    assert info.value.status_code == 404 and "not found" in info.value.error
    if target.server is not None:
        assert info.value.error == f'model "{MISSING}" not found, try pulling it first'
        raw = httpx.post(f"{target.url}/api/chat", json={"model": MISSING, "messages": []})
        assert raw.status_code == 404 and raw.json() == {"error": f'model "{MISSING}" not found, try pulling it first'}
    with pytest.raises(ollama.ResponseError) as shown:
        client.show(MISSING)
    assert shown.value.status_code == 404


def test_bad_requests_are_400s(target: Target, loopback: OllamaServer) -> None:
    url = f"{target.url}/api/generate"
    assert httpx.post(url, content=b"").json() == {"error": "missing request body"}
    bad_json = httpx.post(url, content=b"{not json")
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    wrong_type = httpx.post(url, json={"model": target.tag, "prompt": 3})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"].startswith("json: cannot unmarshal number into Go struct field")
    assert httpx.post(url, json={"prompt": "hi"}).json() == {"error": "model is required"}
    raw_system = httpx.post(url, json={"model": target.tag, "prompt": "hi", "raw": True, "system": "x"})
    assert raw_system.status_code == 400 and "raw mode" in raw_system.json()["error"]
    option = httpx.post(url, json={"model": target.tag, "prompt": "hi", "options": {"num_predict": "lots"}})
    assert option.json() == {"error": 'option "num_predict" must be of type integer'}
    assert httpx.get(url).status_code == 405 and httpx.get(f"{target.url}/api/nothing").status_code == 404


def test_a_failure_while_generating_is_a_500(client: ollama.Client, target: Target, loopback: OllamaServer) -> None:
    loopback.fail_next_generation("llama.cpp blew up")
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(target.tag, PROMPT, raw=True, options={"num_predict": 2})
    assert (info.value.status_code, info.value.error) == (500, "llama.cpp blew up")
    loopback.fail_next_generation("again")
    with pytest.raises(ollama.ResponseError, match="again"):
        list(client.generate(target.tag, PROMPT, raw=True, stream=True, options={"num_predict": 2}))
    assert client.generate(target.tag, PROMPT, raw=True, options={"num_predict": 2}).done  # the server recovers


# --- the provider ------------------------------------------------------------------------------------------------


def test_provider_greedy_output_equals_the_in_process_model(provider: backend.OllamaProvider, loopback: OllamaServer,
                                                            smollm_path: Path) -> None:
    from llmlab_fixtures.testing.backing_model import BackingModel

    requests = [GenerationRequest(PROMPT, max_new_tokens=12),
                GenerationRequest("Question: Which gas do plants take in?\nAnswer:", stop=("\n",), max_new_tokens=24)]
    reference = BackingModel(smollm_path, n_threads=1)
    try:
        expected = ["".join(reference.complete(r.prompt, max_tokens=r.max_new_tokens, stop=list(r.stop)).pieces)
                    for r in requests]
    finally:
        reference.llm.close()
    got = [provider.generate(r).text for r in requests]
    assert got == expected
    assert got[0]  # something was generated


def test_provider_records_ollama_timings_and_ttft(provider: backend.OllamaProvider, target: Target) -> None:
    result = provider.generate(GenerationRequest(PROMPT, max_new_tokens=8))
    extra = result.extra
    assert set(backend.TIMING_FIELDS) <= set(extra) and extra["done_reason"] in ("stop", "length")
    assert all(isinstance(extra[k], int) for k in backend.TIMING_FIELDS)
    assert extra["prompt_eval_count"] == result.prompt_tokens == result.evaluated_tokens > 0
    assert extra["eval_count"] == result.completion_tokens > 0
    assert extra["prompt_eval_duration"] > 0 and extra["total_duration"] >= extra["prompt_eval_duration"]
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.total_s
    assert result.text


def test_provider_is_deterministic_and_cuts_at_stops(provider: backend.OllamaProvider) -> None:
    request = GenerationRequest(PROMPT, max_new_tokens=10)
    first = provider.generate(request).text
    assert provider.generate(request).text == first
    stop = first.strip().split()[0] if first.strip() else " "
    cut = provider.generate(GenerationRequest(PROMPT, stop=(stop,), max_new_tokens=10)).text
    assert stop not in cut and first.startswith(cut)


def test_provider_model_info_and_memory(provider: backend.OllamaProvider, target: Target) -> None:
    assert provider.backend == "ollama" and provider.supports_loglikelihood is False
    with pytest.raises(LoglikelihoodUnsupported):
        provider.loglikelihood([LoglikelihoodRequest("a", " b")])
    info = provider.get_model_info()
    assert info.name == f"ollama:{target.tag}" and info.backend == "ollama"
    assert info.architecture and info.parameters and info.parameters > 0
    assert info.context_length and info.context_length > 0 and info.quantization
    assert info.file_size and info.file_size > 0
    assert info.data_location == data_location(target.url)
    assert info.extra["host"] == target.url and info.extra["num_ctx"] == min(info.context_length, 8192)
    assert provider.estimate_memory() > info.file_size
    if target.server is not None:
        assert info.data_location.startswith("loopback 127.0.0.1:")
        assert (info.architecture, info.parameters, info.quantization) == ("llama", 134515008, "Q4_1")
        assert info.add_bos_token is False


def test_list_pulled_models(target: Target) -> None:
    models = {m["name"]: m for m in backend.list_pulled_models()}
    assert target.tag in models and models[target.tag]["size"] > 0 and models[target.tag]["host"] == target.url
    with pytest.raises(ModelUnavailable, match="cannot reach Ollama"):
        backend.list_pulled_models(f"127.0.0.1:{closed_port()}")


def test_check_spec_passes_for_a_pulled_model(target: Target) -> None:
    backend.check_spec(spec(target.tag), settings())


def test_x_and_x_latest_are_the_same_tag(loopback: OllamaServer) -> None:
    for tag in ("tiny-smollm", "tiny-smollm:latest", "Tiny-SmolLM"):
        backend.check_spec(spec(tag), settings())


def test_check_spec_dead_server_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    with pytest.raises(ModelUnavailable) as info:
        backend.check_spec(spec(TAG), settings())
    assert str(info.value) == (f"cannot reach Ollama at http://127.0.0.1:{port}: start it with `ollama serve` "
                               "(or set OLLAMA_HOST)")


def test_check_spec_unpulled_model_is_one_line() -> None:
    with pytest.raises(ModelUnavailable) as info:
        backend.check_spec(spec(MISSING), settings())
    assert str(info.value) == f"Ollama model {MISSING} is not pulled: run `ollama pull {MISSING}`"


def test_provider_errors_are_one_line(target: Target, loopback: OllamaServer,
                                      provider: backend.OllamaProvider) -> None:
    loopback.fail_next_generation("out of memory")
    with pytest.raises(LlmlabError) as failed:
        provider.generate(GenerationRequest(PROMPT, max_new_tokens=4))
    assert str(failed.value) == f"Ollama at {target.url} failed on {target.tag}: out of memory (HTTP 500)"
    loopback.drop_next_stream(after_chunks=1)
    with pytest.raises(LlmlabError, match=rf"^Ollama at {re.escape(target.url)} stopped answering: "):
        provider.generate(GenerationRequest(PROMPT, max_new_tokens=8))
    assert provider.generate(GenerationRequest(PROMPT, max_new_tokens=2)).completion_tokens > 0
    with pytest.raises(ModelUnavailable, match=r"is not pulled: run `ollama pull "):
        backend.make_provider(spec(MISSING), settings()).initialize()


def test_server_stopped_mid_run_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, loopback: OllamaServer,
                                                    smollm_path: Path) -> None:
    with OllamaServer({"solo:latest": smollm_path}, num_ctx=8192, num_thread=1) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        solo = backend.make_provider(spec("solo"), settings())
        solo.initialize()
        assert solo.generate(GenerationRequest(PROMPT, max_new_tokens=2)).completion_tokens > 0
        url = server.url
    try:
        with pytest.raises(LlmlabError) as info:
            solo.generate(GenerationRequest(PROMPT, max_new_tokens=2))
        assert str(info.value) == f"Ollama at {url} stopped answering: connection refused"
    finally:
        solo.close()  # nothing to unload any more; must not raise


def test_close_unloads_the_model(target: Target, client: ollama.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    p = backend.make_provider(spec(target.tag), settings())
    p.initialize()
    assert target.tag in loaded(client)
    p.close()
    assert wait_until(lambda: target.tag not in loaded(client)), loaded(client)


# --- entry points ------------------------------------------------------------------------------------------------


def test_running_ollama_server_context_manager(smollm_path: Path) -> None:
    with running_ollama_server({"smollm2:135m": smollm_path}) as url:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert httpx.get(url).text == "Ollama is running"
        assert [m.model for m in ollama.Client(host=url).list().models] == ["smollm2:135m"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_command_line_server(smollm_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmlab_fixtures.testing.ollama_server", "--port", "0", "--quiet",
         "--model", f"smollm2:135m={smollm_path}"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"Listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        names = [m.model for m in ollama.Client(host=match.group(1)).list().models]
        assert names == ["smollm2:135m"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


# --- end to end through the plugin -------------------------------------------------------------------------------


def test_bench_run_on_ollama_scores_by_generation(bench_pytester: pytest.Pytester, data_dir: Path,
                                                  target: Target) -> None:
    label = f"ollama:{target.tag}"
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge", f"--models={label}", "--limit=3", "--threads=1", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider", "-p", "no:randomly",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines(["*llmlab comparison (generate scoring)*", f"dataset (metric)*{label}*",
                                 "arc_challenge (*it/s*"])
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 3 and {i["backend"] for i in items} == {"ollama"} and {i["model"] for i in items} == {label}
    for item in items:
        assert item["error"] is None, item["error"]
        assert item["loglikelihoods"] is None and isinstance(item["response"], str)
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {r["scoring"] for r in rows} == {"generate"} and all(float(r["items_per_s"]) > 0 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["models"][label]["data_location"] == data_location(target.url)


def test_concurrent_requests_give_one_at_a_time_replies_in_order(target: Target, data_dir: Path) -> None:
    """--concurrency keeps several requests open at the server (a server with parallel slots serves them side by
    side); the items come back in order with the replies of one request at a time."""
    from llmlab_fixtures.eval.datasets import load_docs
    from llmlab_fixtures.eval.evaluator import evaluate
    from llmlab_fixtures.tasks import get_task

    task = get_task("arc_challenge")  # multiple choice by a generated letter: short replies
    docs, shots = load_docs(task, data_dir)[:6], load_docs(task, data_dir, split="train")
    runs = []
    for concurrency in (1, 4):
        if target.server is not None:
            target.server.peak_in_flight = 0
        with backend.make_provider(spec(target.tag), settings(concurrency=concurrency)) as p:
            assert p.max_concurrency == concurrency
            runs.append(evaluate(task, p, docs, model_name="o", fewshot_docs=shots, scoring="generate",
                                 num_fewshot=1))
    one, four = runs
    assert [i.item_id for i in four.items] == [i.item_id for i in one.items] == [d["id"] for d in docs]
    assert [i.response for i in four.items] == [i.response for i in one.items]
    assert not any(i.error for i in four.items)
    if target.server is not None:
        assert target.server.peak_in_flight >= 2
