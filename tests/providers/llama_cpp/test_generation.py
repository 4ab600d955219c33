"""Continuous batching on both in-process backends: streams/rows refilled as replies end, with the replies of one
prompt at a time (real SmolLM2, real GSM8K rows)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.prompts import ExemplarSampler, generation_request
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.providers.base import GenerationRequest
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.tasks import get_task


@pytest.fixture(scope="module")
def gguf() -> Path:
    return embedded_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def streams8(gguf: Path) -> Iterator[LlamaCppProvider]:
    with LlamaCppProvider(gguf, "smollm2-8", n_threads=2, parallel=8) as provider:
        yield provider


@pytest.fixture(scope="module")
def alone(gguf: Path) -> Iterator[LlamaCppProvider]:
    with LlamaCppProvider(gguf, "smollm2-1", n_threads=2, parallel=1) as provider:
        yield provider


def mixed_requests(data_dir: Path, n: int, shots: int = 0, fixed: bool = False) -> list[GenerationRequest]:
    """GSM8K prompts with stop strings and token limits that differ per item, so streams end for every reason at
    different times: the stop string "Question:", a stop string met mid-reply ("=" in most answers), and limits
    from 4 to 40 tokens."""
    task = get_task("gsm8k")
    docs = load_docs(task, data_dir)[:n]
    sampler = ExemplarSampler(task, load_docs(task, data_dir, split="train"), shots, seed=1234, fixed=fixed)
    requests = []
    for i, doc in enumerate(docs):
        base = generation_request(task, doc, sampler.exemplars(doc))
        stops = ("Question:", "=") if i % 3 == 1 else ("Question:",)
        requests.append(GenerationRequest(base.prompt, stops, max_new_tokens=(4, 40, 12, 25)[i % 4]))
    return requests


def test_eight_streams_refilled_give_the_replies_of_one_at_a_time(streams8: LlamaCppProvider,
                                                                   alone: LlamaCppProvider, data_dir: Path) -> None:
    requests = mixed_requests(data_dir, 14)  # more prompts than streams: streams are refilled
    batched = streams8.generate_batch(requests)
    single = [alone.generate(r) for r in requests]
    for request, many, one in zip(requests, batched, single, strict=True):
        assert not isinstance(many, Exception)
        assert many.text == one.text
        assert (many.completion_tokens, many.prompt_tokens) == (one.completion_tokens, one.prompt_tokens)
        assert many.extra["stop_reason"] == one.extra["stop_reason"]
        assert many.completion_tokens <= request.max_new_tokens
        assert not any(stop in many.text for stop in request.stop)
        assert many.ttft_s is not None and 0 < many.ttft_s <= many.total_s
    reasons = {r.extra["stop_reason"] for r in single}
    assert {"length", "stop"} <= reasons, reasons  # limits and stop strings both ended streams
    assert any(r.extra["stop_reason"] == "length" and r.completion_tokens == 4 for r in single)
    print(f"\n8 streams == 1: {[r.text[:24] for r in single[:4]]} ... reasons {sorted(reasons)}")


def test_streams_side_by_side_give_llama_cpps_own_replies(streams8: LlamaCppProvider, gguf: Path,
                                                         data_dir: Path) -> None:
    """Eight streams taking one-token steps in shared calls answer as llama.cpp's own generation does one prompt at
    a time (llama-cpp-python's ``Llama``, the engine behind its server and lm-eval's gguf route), and the check
    that sizes the streams found all eight exact."""
    from llmlab_fixtures.testing.no_repack import load_llama

    requests = mixed_requests(data_dir, 10, shots=1)
    ours = streams8.generate_batch(requests)
    llm = load_llama(gguf, n_ctx=4096, n_threads=2, verbose=False)
    try:
        theirs = [llm.create_completion(r.prompt, max_tokens=r.max_new_tokens, stop=list(r.stop),
                                        temperature=0.0)["choices"][0]["text"] for r in requests]
    finally:
        llm.close()
    assert [r.text for r in ours if not isinstance(r, Exception)] == theirs
    assert streams8.get_model_info().extra["generation_streams"] == 8
    assert streams8.notice is None


def test_fixed_exemplars_are_evaluated_once_and_copied(streams8: LlamaCppProvider, alone: LlamaCppProvider,
                                                       data_dir: Path) -> None:
    """With the same exemplars for every item the first prompt's prefix is decoded once and copied to the other
    streams: each later item evaluates only its question, and replies stay those of one at a time."""
    requests = mixed_requests(data_dir, 10, shots=3, fixed=True)
    streams8.reset_cache()
    batched = streams8.generate_batch(requests)
    single = [alone.generate(r) for r in requests]
    assert [r.text for r in batched] == [r.text for r in single]
    first, rest = batched[0], batched[1:]
    assert first.evaluated_tokens == first.prompt_tokens
    assert all(r.extra["reused_prompt_tokens"] > 200 for r in rest)
    assert sum(r.evaluated_tokens for r in batched) < 0.4 * sum(r.prompt_tokens for r in batched)


def test_an_item_that_fails_in_a_batch_fails_alone(streams8: LlamaCppProvider, data_dir: Path) -> None:
    """A GSM8K row without its question fails while its prompt is built; the other items of its batch are scored
    as in a clean run and the failure is that item's error."""
    task = get_task("gsm8k")
    docs = load_docs(task, data_dir)[:10]
    broken = [dict(doc) for doc in docs]
    del broken[4]["question"]
    runs = [evaluate(task, streams8, d, model_name="m", fewshot_docs=None, scoring="generate", num_fewshot=0)
            for d in (docs, broken)]
    clean, with_error = runs
    assert with_error.items[4].error and "question" in with_error.items[4].error
    for n, (a, b) in enumerate(zip(clean.items, with_error.items, strict=True)):
        if n != 4:
            assert (a.item_id, a.response, a.completion_tokens, b.error) == (b.item_id, b.response,
                                                                             b.completion_tokens, None)
            assert a.latency_s > 0 and a.ttft_s is not None and a.ttft_s <= a.latency_s


def test_transformers_rows_refilled_give_the_replies_of_generate(data_dir: Path) -> None:
    """Rows refilled as replies end (continuous batching) answer as transformers' own generate() does one prompt
    at a time (lm-eval's batch size 1): same text, tokens and stop reason on every item."""
    pytest.importorskip("transformers")
    from llmlab_fixtures.providers.transformers.locate import ModelSource
    from llmlab_fixtures.providers.transformers.provider import TransformersProvider

    provider = TransformersProvider(ModelSource("gguf", embedded_gguf(SMOLLM2)), "tf", device="cpu", threads=2)
    provider.initialize()
    try:
        provider.generation_rows = 3
        requests = mixed_requests(data_dir, 8)
        batched = provider.generate_batch(requests)
        single = [provider._generate_rows([r])[0] for r in requests]  # generate() on a batch of one
        for many, one in zip(batched, single, strict=True):
            assert (many.text, many.completion_tokens, many.extra["stop_reason"]) == (
                one.text, one.completion_tokens, one.extra["stop_reason"])
            assert many.ttft_s is not None and 0 < many.ttft_s <= many.total_s
        fixed = mixed_requests(data_dir, 4, shots=2, fixed=True)
        shared = provider.generate_batch(fixed)
        assert [r.text for r in shared] == [provider._generate_rows([r])[0].text for r in fixed]
        assert all(r.extra["reused_prompt_tokens"] > 100 for r in shared[1:3])
    finally:
        provider.close()


@pytest.mark.filterwarnings("ignore:.*replies generated side by side")
def test_streams_whose_kernels_would_change_replies_are_capped(data_dir: Path) -> None:
    """With CPU weight repacking on (``batch_invariant`` off), Gemma 3's Q4_K weights may take another matrix
    kernel for several columns than for one. The check then caps the streams that generate side by side, and
    replies stay those of one stream whatever it found (printed: how many streams it allowed)."""
    from llmlab_fixtures.models.gguf import GEMMA3_270M

    gemma = embedded_gguf(GEMMA3_270M)
    requests = mixed_requests(data_dir, 6)
    replies = []
    for parallel in (1, 4):
        with LlamaCppProvider(gemma, f"gemma-{parallel}", n_threads=2, parallel=parallel,
                              batch_invariant=False) as provider:
            replies.append([r.text for r in provider.generate_batch(requests)])
            width = provider.get_model_info().extra["generation_streams"]
            assert (provider.notice is None) == (width == parallel)
    assert replies[0] == replies[1]
    print(f"\nrepacked Gemma 3: {width} of 4 streams generate side by side")
