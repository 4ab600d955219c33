"""Multiple choice scored from a Completions server's prompt log-probabilities (``openai-compat:``): against the
vLLM-semantics stand-in they agree with in-process llama.cpp; servers that report them wrongly are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import parse_spec
from llmlab_fixtures.providers import BackendSettings, LoglikelihoodRequest, check_available, create_provider
from llmlab_fixtures.providers import prompt_logprobs as plp
from llmlab_fixtures.testing.openai_server import running_llama_cpp_openai_server
from llmlab_fixtures.testing.vllm_server import VllmState, running_vllm_server

SMOLLM = "llama-cpp:smollm2-135m"
SERVED = "openai-compat:smollm2"
UNSCORED = "openai-compat:nolp"
SHIFTED = "its prompt log-probabilities are shifted by one token"
NONE = "it returns no prompt log-probabilities"


@pytest.fixture(scope="module")
def vllm() -> Iterator[VllmState]:
    with running_vllm_server(embedded_gguf(SMOLLM2), "smollm2") as state:
        yield state


@pytest.fixture(scope="module")
def no_logprobs() -> Iterator[VllmState]:
    with running_vllm_server(embedded_gguf(SMOLLM2), "nolp", prompt_logprobs=False) as state:
        yield state


@pytest.fixture(scope="module")
def llama_cpp_python_server() -> Iterator[str]:
    with running_llama_cpp_openai_server(embedded_gguf(SMOLLM2), "smollm2", extra_args=["--logits_all", "true"]) as url:
        yield url


def _spec(url: str):
    return parse_spec(f"openai-compat:{url}#smollm2", builtin_models())


def _items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_continuations_are_located_by_the_servers_offsets(vllm: VllmState) -> None:
    settings = BackendSettings(scoring="loglik", concurrency=2)
    spec = _spec(vllm.url)
    check_available(spec, settings)
    provider = create_provider(spec, settings)
    provider.initialize()
    assert provider.supports_loglikelihood
    context = "Question: What is the capital of France?\nAnswer:"
    right, wrong = provider.loglikelihood([LoglikelihoodRequest(context, " Paris"),
                                           LoglikelihoodRequest(context, " Banana")])
    assert right.logprob > wrong.logprob and right.continuation_tokens == 1 and right.context_tokens > 5
    # the probe's counting continuation is greedy, and its summed log-probability is close to 0
    probe = provider.loglikelihood([LoglikelihoodRequest(plp.PROBE_CONTEXT, plp.PROBE_CONTINUATION)])[0]
    assert probe.is_greedy and -3.0 < probe.logprob < 0


def test_scores_through_the_server_agree_with_in_process_llama_cpp(bench_pytester: pytest.Pytester, data_dir: Path,
                                                                   vllm: VllmState) -> None:
    """ARC-Challenge and HellaSwag, the same 40 items each, scored in one run by in-process llama.cpp and through
    the server: the same prediction on >= 95% of items (the server tokenizes the prompt as one text)."""
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge or hellaswag", f"--models=local:smollm2-135m,openai-compat:{vllm.url}#smollm2",
        "--limit=40", f"--data-dir={data_dir}", f"--output-dir={out}", "-p", "no:cacheprovider", "--no-checkpoint")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"llmlab: {SERVED}: log-likelihoods from the server's prompt log-probabilities*",
                                 "*llmlab comparison (loglik scoring)*"])
    items = _items(out / "items.jsonl")
    assert all(item["error"] is None for item in items)
    for dataset in ("arc_challenge", "hellaswag"):
        local = {i["item_id"]: i for i in items if i["dataset"] == dataset and i["model"] == SMOLLM}
        served = {i["item_id"]: i for i in items if i["dataset"] == dataset and i["model"] == SERVED}
        assert set(local) == set(served) and len(local) == 40
        same = sum(local[k]["prediction"] == served[k]["prediction"] for k in local)
        diffs = [abs(a - b) for k in local
                 for a, b in zip(local[k]["loglikelihoods"], served[k]["loglikelihoods"], strict=True)]
        print(f"{dataset}: same prediction on {same}/40; |loglik difference| median "
              f"{sorted(diffs)[len(diffs) // 2]:.4f}, max {max(diffs):.4f} nats")
        assert same >= 38


def test_a_server_that_shifts_prompt_logprobs_is_refused(llama_cpp_python_server: str) -> None:
    """llama-cpp-python's server reports each prompt token's value from the logits after it."""
    spec = _spec(llama_cpp_python_server)
    with pytest.raises(ModelUnavailable, match=f"--scoring loglik needs prompt log-probabilities, but .*: {SHIFTED}"):
        check_available(spec, BackendSettings(scoring="loglik"))
    assert not create_provider(spec, BackendSettings()).supports_loglikelihood


def test_refused_servers_are_scored_by_no_one_and_the_others_run(bench_pytester: pytest.Pytester, data_dir: Path,
                                                                 llama_cpp_python_server: str,
                                                                 no_logprobs: VllmState) -> None:
    out = bench_pytester.path / "run"
    models = (f"local:smollm2-135m,openai-compat:{llama_cpp_python_server}#smollm2,"
              f"openai-compat:{no_logprobs.url}#nolp")
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", f"--models={models}", "--limit=2", "--scoring=loglik", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider", "--no-checkpoint")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"llmlab: skipped {SERVED}: *{llama_cpp_python_server}: {SHIFTED}*",
                                 f"llmlab: skipped {UNSCORED}: *{no_logprobs.url}: {NONE}*"])
    assert {i["model"] for i in _items(out / "items.jsonl")} == {SMOLLM}


def test_auto_scoring_says_why_a_server_answers_by_generation(bench_pytester: pytest.Pytester, data_dir: Path,
                                                              no_logprobs: VllmState) -> None:
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", f"--models=openai-compat:{no_logprobs.url}#nolp", "--limit=2", f"--data-dir={data_dir}",
        f"--output-dir={bench_pytester.path / 'run'}", "-p", "no:cacheprovider", "--no-checkpoint")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"llmlab: {UNSCORED}: no log-likelihoods from {no_logprobs.url}: {NONE}*",
                                 "*llmlab comparison (generate scoring)*"])
