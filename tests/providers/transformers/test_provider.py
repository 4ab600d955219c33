"""TransformersProvider on the embedded SmolLM2 / Gemma 3 GGUFs, checked against LlamaCppProvider (no mocks).

Run with ``-s`` to see the agreement figures (predicted choice and mean |Δ logprob| per dataset).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.prompts import ExemplarSampler, generation_request, loglikelihood_requests
from llmlab_fixtures.models.gguf import GEMMA3_270M, SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import ModelSpec, parse_spec
from llmlab_fixtures.providers import BackendSettings, check_available, create_provider
from llmlab_fixtures.providers.base import GenerationRequest, LoglikelihoodRequest, LoglikelihoodResult
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.providers.transformers.provider import TransformersProvider, make_provider
from llmlab_fixtures.providers.transformers.scoring import _score_continuations
from llmlab_fixtures.run.worker import default_threads
from llmlab_fixtures.tasks import get_task

THREADS = default_threads()  # physical cores / xdist workers, as the plugin chooses
# LLMLAB_TEST_DEVICE=cuda (or mps) runs these tests on a GPU, in fp32 so that the tolerances keep their meaning
DEVICE = os.environ.get("LLMLAB_TEST_DEVICE", "cpu")
SETTINGS = BackendSettings(threads=THREADS, device=DEVICE, dtype="float32")
# fp32, batched vs one row per forward pass; GPU kernels change their reduction order with the batch's shape
BATCH_TOL = 1e-4 if DEVICE == "cpu" else 1e-3
# predicted choice and nats per continuation, one model in two numerics: dequantised fp32 (transformers) vs quantised
# kernels (llama.cpp), or fp32 vs a GPU's half precision
MIN_AGREEMENT = 0.85
MAX_MEAN_ABS_DELTA = 0.6
# Loading Gemma 3's weights from GGUF takes transformers about a minute on 2 cores; opt in with LLMLAB_SLOW_TESTS=1.
SLOW = os.environ.get("LLMLAB_SLOW_TESTS", "") not in ("", "0")


def spec(raw: str) -> ModelSpec:
    return parse_spec(raw, builtin_models())


@contextmanager
def settings(provider: TransformersProvider, **values: object) -> Iterator[None]:
    """The provider's attributes set to ``values`` for the block, then restored."""
    saved = {name: getattr(provider, name) for name in values}
    for name, value in values.items():
        setattr(provider, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(provider, name, value)


def mc_items(data_dir: Path, task_name: str, n: int) -> list[tuple[list[LoglikelihoodRequest], int]]:
    """The first ``n`` items of a multiple-choice task: lm-eval's requests and the gold index."""
    task = get_task(task_name)
    return [(loglikelihood_requests(task, doc), task.target(doc)) for doc in load_docs(task, data_dir)[:n]]


def gsm8k_requests(data_dir: Path, n: int, shots: int = 1, max_new_tokens: int = 40) -> list[GenerationRequest]:
    task = get_task("gsm8k")
    sampler = ExemplarSampler(task, load_docs(task, data_dir, split="train"), shots)
    docs = load_docs(task, data_dir)[:n]
    return [generation_request(task, doc, sampler.exemplars(doc), max_new_tokens=max_new_tokens) for doc in docs]


def real_prompts(data_dir: Path) -> list[LoglikelihoodRequest]:
    """Requests from ARC-Challenge, HellaSwag, MMLU and TruthfulQA items, plus GSM8K prompts (empty continuation)."""
    requests: list[LoglikelihoodRequest] = []
    for name, n in (("arc_challenge", 10), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc1", 3)):
        for reqs, _gold in mc_items(data_dir, name, n):
            requests.extend(reqs)
    requests += [LoglikelihoodRequest(r.prompt, "") for r in gsm8k_requests(data_dir, 4, shots=2)]
    return requests


def predictions(results: Sequence[LoglikelihoodResult], requests: Sequence[LoglikelihoodRequest]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): argmax of logprob, and of logprob per continuation character."""
    lps = [r.logprob for r in results]
    norm = [lp / max(1, len(req.continuation)) for lp, req in zip(lps, requests)]
    return int(np.argmax(lps)), int(np.argmax(norm))


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def empty_hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty Hugging Face cache (here and in pytester runs): aliases load their GGUF whatever this machine holds."""
    import huggingface_hub.constants

    path = tmp_path_factory.mktemp("empty-hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
        patch.setenv("HF_HUB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tf_smollm() -> Iterator[TransformersProvider]:
    provider = make_provider(spec("transformers:smollm2-135m"), SETTINGS)
    provider.initialize()
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def lc_smollm() -> Iterator[LlamaCppProvider]:
    if DEVICE != "cpu":  # seen on an H200: a CUDA llama.cpp build and CUDA torch in one process crashed
        pytest.skip("transformers vs llama.cpp runs with LLMLAB_TEST_DEVICE=cpu only")
    with LlamaCppProvider(embedded_gguf(SMOLLM2), "llama-cpp:smollm2-135m", n_ctx=2048, n_threads=THREADS) as p:
        yield p


@pytest.fixture(scope="module")
def tf_gemma() -> Iterator[TransformersProvider]:
    """Gemma 3 with only its tokenizer loaded (the weights load in test_gemma3_gguf_loads_and_agrees_with_llama_cpp)."""
    provider = make_provider(spec("transformers:gemma3-270m"), SETTINGS)
    provider.load_tokenizer()
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def lc_gemma() -> Iterator[LlamaCppProvider]:
    with LlamaCppProvider(embedded_gguf(GEMMA3_270M), "llama-cpp:gemma3-270m", n_ctx=2048, n_threads=THREADS) as p:
        yield p


# --- loading and model info -----------------------------------------------------------------------


def test_alias_without_cached_repo_loads_the_embedded_gguf(tf_smollm: TransformersProvider) -> None:
    info = tf_smollm.get_model_info()
    assert info.name == "transformers:smollm2-135m" and info.backend == "transformers"
    assert info.path == str(embedded_gguf(SMOLLM2))
    assert info.architecture == "llama" and info.parameters == 134_515_008
    assert info.quantization == "dequantised from Q4_1"
    assert info.context_length == 8192 and info.file_size == embedded_gguf(SMOLLM2).stat().st_size
    assert info.add_bos_token is False and info.data_location == "in-process"
    assert info.extra["source"] == "gguf" and info.extra["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (info.extra["device"], info.extra["dtype"]) == (DEVICE, "float32")
    assert info.extra["batch_size"] == "auto" and info.extra["auto_batch_max_rows"] == 64
    json.dumps(info.extra)  # results.json must be able to hold it
    weights = 134_515_008 * 4
    assert weights < tf_smollm.estimate_memory() < 3 * weights


def test_model_info_before_loading_reads_the_gguf_header() -> None:
    provider = make_provider(spec("transformers:smollm2-135m"), BackendSettings(batch_size=8))
    info = provider.get_model_info()
    assert (info.architecture, info.parameters, info.quantization) == ("llama", 134_515_008, "dequantised from Q4_1")
    assert info.add_bos_token is False and info.extra["batch_size"] == 8 and info.extra["device"] == "auto"
    assert provider.estimate_memory() > 134_515_008 * 4


REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hf_cache(tf_smollm: TransformersProvider, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding SmolLM2's repo as fp32 safetensors + tokenizer, written from the loaded GGUF."""
    from safetensors.torch import save_model

    root = tmp_path_factory.mktemp("hf-cache")
    repo_dir = root / f"models--{REPO.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    model = tf_smollm._model
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (snapshot / "config.json").write_text(json.dumps(config))
    save_model(model, str(snapshot / "model.safetensors"))  # drops the tied lm_head copy
    tf_smollm._tokenizer.save_pretrained(snapshot)
    return root


def test_alias_prefers_its_repo_in_the_hugging_face_cache(hf_cache: Path, tf_smollm: TransformersProvider,
                                                          lc_smollm: LlamaCppProvider, data_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    snapshot = next((hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    for raw, kind in (("transformers:smollm2-135m", "hf-cache"), (f"transformers:{REPO}", "hf-cache"),
                      (f"transformers:{snapshot}", "directory")):
        check_available(spec(raw), SETTINGS)
        assert make_provider(spec(raw), SETTINGS).source.kind == kind, raw
    provider = make_provider(spec("transformers:smollm2-135m"), SETTINGS)
    assert provider.get_model_info().architecture == "llama"  # from config.json, before loading
    provider.initialize()
    try:
        info = provider.get_model_info()
        assert (info.extra["source"], info.extra["repo"], info.path) == ("hf-cache", REPO, str(snapshot))
        assert info.quantization == "float32" and info.add_bos_token is False and info.parameters == 134_515_008
        requests = [r for reqs, _ in mc_items(data_dir, "arc_challenge", 3) for r in reqs]
        assert_same_tokens(provider, lc_smollm, requests)
        for a, b in zip(provider.loglikelihood(requests), tf_smollm.loglikelihood(requests)):
            assert a.logprob == pytest.approx(b.logprob, abs=BATCH_TOL) and a.is_greedy == b.is_greedy
    finally:
        provider.close()


# --- tokenization ---------------------------------------------------------------------------------


def assert_same_tokens(tf: TransformersProvider, lc: LlamaCppProvider,
                       requests: Sequence[LoglikelihoodRequest]) -> None:
    for req in requests:
        assert tf.encode_pair(req.context, req.continuation) == lc.encode_pair(req.context, req.continuation), req
        assert tf.tokenize(req.context) == lc.tokenize(req.context), req.context
    assert tf.encode_pair("", " Paris") == lc.encode_pair("", " Paris")  # empty context: lm-eval's prefix token
    special = "a <|im_end|> b <end_of_turn> c <bos>"  # special-token text is plain text, as in llama.cpp
    assert tf.tokenize(special) == lc.tokenize(special)


def test_tokens_match_llama_cpp_smollm(tf_smollm: TransformersProvider, lc_smollm: LlamaCppProvider,
                                       data_dir: Path) -> None:
    assert tf_smollm.add_bos is lc_smollm.add_bos is False
    assert_same_tokens(tf_smollm, lc_smollm, real_prompts(data_dir))


def test_context_whitespace_moves_to_the_continuation(tf_smollm: TransformersProvider) -> None:
    ctx, cont = tf_smollm.encode_pair("Question: 2+2?\nAnswer: ", "4")
    assert ctx == tf_smollm.tokenize("Question: 2+2?\nAnswer:")
    assert ctx + cont == tf_smollm.tokenize("Question: 2+2?\nAnswer: 4")


# --- log-likelihood -------------------------------------------------------------------------------


def test_batched_loglikelihood_equals_one_row_at_a_time(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    requests = [r for reqs, _ in mc_items(data_dir, "arc_challenge", 2) for r in reqs]
    requests += [r for reqs, _ in mc_items(data_dir, "hellaswag", 2) for r in reqs]
    random.Random(7).shuffle(requests)
    with settings(tf_smollm, share_prefix=False):
        batched = tf_smollm.loglikelihood(requests)  # auto: one forward pass here
        with settings(tf_smollm, batch_size=3):
            threes = tf_smollm.loglikelihood(requests)
        with settings(tf_smollm, batch_size=1):
            single = [tf_smollm.loglikelihood([r])[0] for r in requests]  # ground truth for the order, too
    assert len(batched) == len(threes) == len(single) == len(requests)
    for a, b, c, req in zip(batched, threes, single, requests):
        assert a.logprob == pytest.approx(c.logprob, abs=BATCH_TOL) and b.logprob == pytest.approx(c.logprob,
                                                                                                   abs=BATCH_TOL)
        assert a.is_greedy == b.is_greedy == c.is_greedy
        ctx, cont = tf_smollm.encode_pair(req.context, req.continuation)
        assert (a.context_tokens, a.continuation_tokens) == (c.context_tokens, c.continuation_tokens)
        assert (a.context_tokens, a.continuation_tokens, a.evaluated_tokens) == (len(ctx), len(cont),
                                                                                 len(ctx) + len(cont) - 1)
    worst = max(abs(a.logprob - c.logprob) for a, c in zip(batched, single))
    print(f"\nbatched vs one row per pass: max |Δ logprob| = {worst:.2e} over {len(requests)} requests")


def test_shared_prefixes_match_scratch(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    """An item's context and, across items, TruthfulQA's primer and MMLU's few-shot block run once: same scores."""
    mmlu = get_task("mmlu")
    shots = ExemplarSampler(mmlu, load_docs(mmlu, data_dir, split="dev"), 5)
    items = [reqs for reqs, _ in mc_items(data_dir, "truthfulqa_mc2", 3)]
    items += [loglikelihood_requests(mmlu, doc, shots.exemplars(doc)) for doc in load_docs(mmlu, data_dir)[:3]]
    with settings(tf_smollm, share_prefix=False):
        scratch = [tf_smollm.loglikelihood(reqs) for reqs in items]
    tf_smollm._prefix = None
    shared = [tf_smollm.loglikelihood(reqs) for reqs in items]  # one call per item, as the evaluator makes them
    assert tf_smollm.share_prefix
    for got, want in zip(shared, scratch):
        assert [r.logprob for r in got] == pytest.approx([r.logprob for r in want], abs=BATCH_TOL)
        assert [r.is_greedy for r in got] == [r.is_greedy for r in want]
        assert [(r.context_tokens, r.continuation_tokens) for r in got] == [
            (r.context_tokens, r.continuation_tokens) for r in want]
    evaluated = [sum(r.evaluated_tokens for r in got) for got in shared]
    full = [sum(r.evaluated_tokens for r in want) for want in scratch]
    primer = len(tf_smollm.tokenize(items[0][0].context.rsplit("\n\nQ:", 1)[0]))  # TruthfulQA's six-question primer
    assert evaluated[1] <= max(r.context_tokens for r in shared[1]) - primer + sum(
        r.continuation_tokens for r in shared[1])  # the second item reuses the primer and its own context
    fewshot = len(tf_smollm.tokenize(items[3][0].context.rsplit("\n\n", 1)[0]))  # MMLU description + 5 shots
    assert evaluated[4] < full[4] - fewshot
    print(f"\ntokens evaluated per item, shared vs scratch: {evaluated} vs {full}")


def test_items_scored_together_match_one_at_a_time(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    """The evaluator's multi-item calls (shared prefix cached, the rest packed as token trees, large or small) give
    each item's scratch scores."""
    from llmlab_fixtures.eval.evaluator import evaluate

    saved, saved_pack = tf_smollm.loglik_items_per_call, tf_smollm._pack_tokens
    mmlu, hellaswag = get_task("mmlu"), get_task("hellaswag")
    cases = [(hellaswag, load_docs(hellaswag, data_dir)[:6], None, 0),  # no shared prefix: contexts batched
             (mmlu, load_docs(mmlu, data_dir)[97:103], load_docs(mmlu, data_dir, split="dev"), 5)]  # subject change
    try:
        for task, docs, fewshot, shots in cases:
            runs = []
            for window, share, pack in ((4, True, 512), (4, True, 48), (1, False, 512)):  # 48: a tree per few rows
                tf_smollm.loglik_items_per_call, tf_smollm._prefix, tf_smollm._pack_tokens = window, None, pack
                with settings(tf_smollm, share_prefix=share):
                    runs.append(evaluate(task, tf_smollm, docs, model_name="t", fewshot_docs=fewshot,
                                         scoring="loglik", num_fewshot=shots))
            alone = runs[-1]
            for together in runs[:-1]:
                assert not any(r.error for r in together.items)
                for a, b in zip(together.items, alone.items):
                    assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=BATCH_TOL)
                    assert (a.item_id, a.prediction, a.prompt_tokens) == (b.item_id, b.prediction, b.prompt_tokens)
            evaluated = [sum(r.evaluated_tokens for r in run.items) for run in runs]
            assert evaluated[0] <= evaluated[1] < evaluated[2]
            print(f"\n{task.name}: tokens evaluated, items together vs alone from scratch: {evaluated}")
    finally:
        tf_smollm.loglik_items_per_call, tf_smollm._pack_tokens = saved, saved_pack


def test_long_requests_are_truncated_from_the_left(tf_smollm: TransformersProvider) -> None:
    context = " ".join(["one two three"] * 20)
    n_cont = len(tf_smollm.encode_pair(context, " four five")[1])
    saved = tf_smollm.max_length
    tf_smollm.max_length = 16
    try:
        [long, short] = tf_smollm.loglikelihood([LoglikelihoodRequest(context, " four five"),
                                                 LoglikelihoodRequest("", " hello")])
    finally:
        tf_smollm.max_length = saved
    assert long.evaluated_tokens == 16 and long.continuation_tokens == n_cont and long.logprob < 0
    assert long.context_tokens > 16
    assert short.context_tokens == 1 and short.evaluated_tokens == 1 + short.continuation_tokens - 1


def compare_choices(items: Sequence[tuple[list[LoglikelihoodRequest], int]], mine: Sequence[LoglikelihoodResult],
                    theirs: Sequence[LoglikelihoodResult]) -> tuple[float, float, list[float]]:
    """Two backends' results for the same items (flattened in order): (acc agreement, acc_norm agreement, |Δ|s)."""
    agree_acc = agree_norm = 0
    deltas: list[float] = []
    offset = 0
    for requests, _gold in items:
        a, b = mine[offset : offset + len(requests)], theirs[offset : offset + len(requests)]
        offset += len(requests)
        deltas += [abs(x.logprob - y.logprob) for x, y in zip(a, b)]
        assert [x.continuation_tokens for x in a] == [y.continuation_tokens for y in b]
        (acc_a, norm_a), (acc_b, norm_b) = predictions(a, requests), predictions(b, requests)
        agree_acc += acc_a == acc_b
        agree_norm += norm_a == norm_b
    return agree_acc / len(items), agree_norm / len(items), deltas


@pytest.mark.parametrize(("task_name", "n_items"), [("arc_challenge", 20), ("hellaswag", 20), ("mmlu", 5)])
def test_choices_agree_with_llama_cpp(tf_smollm: TransformersProvider, lc_smollm: LlamaCppProvider, data_dir: Path,
                                      task_name: str, n_items: int) -> None:
    items = mc_items(data_dir, task_name, n_items)
    tf_results = tf_smollm.loglikelihood([r for reqs, _ in items for r in reqs])  # every item in batched passes
    lc_results = [r for reqs, _ in items for r in lc_smollm.loglikelihood(reqs)]
    acc, norm, deltas = compare_choices(items, tf_results, lc_results)
    print(f"\n{task_name}: {len(items)} items, choice agreement acc {acc:.2f}, acc_norm {norm:.2f}, "
          f"mean |Δ logprob| {np.mean(deltas):.3f} (max {np.max(deltas):.3f}) over {len(deltas)} continuations")
    assert acc >= MIN_AGREEMENT and norm >= MIN_AGREEMENT
    assert np.mean(deltas) < MAX_MEAN_ABS_DELTA


@pytest.mark.skipif(DEVICE == "cpu", reason="a GPU's default dtype: set LLMLAB_TEST_DEVICE=cuda (or mps) on a GPU")
def test_gpu_default_half_precision_agrees_with_fp32(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    """--dtype auto on a GPU loads bf16 (fp16 where bf16 is missing): same choices as fp32 on nearly every item."""
    items = mc_items(data_dir, "arc_challenge", 20) + mc_items(data_dir, "hellaswag", 20)
    requests = [r for reqs, _ in items for r in reqs]
    half = make_provider(spec("transformers:smollm2-135m"), BackendSettings(threads=THREADS, device=DEVICE))
    half.initialize()
    try:
        dtype = half.get_model_info().extra["dtype"]
        assert dtype in ("bfloat16", "float16")
        acc, norm, deltas = compare_choices(items, half.loglikelihood(requests), tf_smollm.loglikelihood(requests))
    finally:
        half.close()
    print(f"\n{dtype} vs fp32 on {DEVICE}, {len(items)} items: choice agreement acc "
          f"{acc:.2f}, acc_norm {norm:.2f}, mean |Δ logprob| {np.mean(deltas):.3f} (max {np.max(deltas):.3f})")
    assert acc >= MIN_AGREEMENT and norm >= MIN_AGREEMENT
    assert np.mean(deltas) < MAX_MEAN_ABS_DELTA


# --- generation -----------------------------------------------------------------------------------


def test_generation_stops_at_stop_strings_and_times_the_first_token(tf_smollm: TransformersProvider,
                                                                    lc_smollm: LlamaCppProvider) -> None:
    prompt = "Write a list of fruits:\n1."
    free = tf_smollm.generate(GenerationRequest(prompt, (), max_new_tokens=12))
    assert free.extra["stop_reason"] == "length" and free.completion_tokens == 12 and "\n" in free.text
    first_line = free.text.split("\n")[0]
    stopped = tf_smollm.generate(GenerationRequest(prompt, ("\n", "Question:"), max_new_tokens=12))
    assert stopped.text == first_line and stopped.extra["stop_reason"] == "stop"
    assert 0 < stopped.completion_tokens < free.completion_tokens
    assert stopped.prompt_tokens == stopped.evaluated_tokens == len(lc_smollm.tokenize(prompt))
    assert stopped.ttft_s is not None and 0 < stopped.ttft_s <= stopped.total_s
    assert free.ttft_s is not None and free.ttft_s < free.total_s
    inside = first_line.strip()[1:3]  # a stop string inside a token's text: the text is cut exactly there
    cut = tf_smollm.generate(GenerationRequest(prompt, (inside,), max_new_tokens=12))
    assert cut.text == first_line[: first_line.find(inside)] and cut.extra["stop_reason"] == "stop"
    empty = tf_smollm.generate(GenerationRequest(prompt, (), max_new_tokens=0))
    assert (empty.text, empty.completion_tokens, empty.ttft_s) == ("", 0, None)
    print(f"\ngeneration: {free.text!r}, ttft {stopped.ttft_s * 1000:.0f} ms, total {stopped.total_s * 1000:.0f} ms")


def test_batched_generation_matches_single_on_gsm8k(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    requests = gsm8k_requests(data_dir, 3, shots=0, max_new_tokens=32)
    assert len({len(tf_smollm.tokenize(r.prompt)) for r in requests}) > 1  # left padding is exercised
    single = [tf_smollm.generate(r) for r in requests]
    batched = tf_smollm.generate_batch(requests)
    for one, many in zip(single, batched):
        assert many.text == one.text
        assert (many.completion_tokens, many.prompt_tokens) == (one.completion_tokens, one.prompt_tokens)
        assert many.extra["stop_reason"] == one.extra["stop_reason"]
        assert many.ttft_s is not None and 0 < many.ttft_s <= many.total_s  # the item's own times in the batch
        assert "Question:" not in one.text and one.text and one.ttft_s is not None
    print(f"\nGSM8K batched == single: {[r.text[:40] for r in single]}")


def test_identical_inputs_are_run_once(tf_smollm: TransformersProvider) -> None:
    """MMLU-style one-token answers run the same input: one row, read by every request, same scores as scratch."""
    context = "The capital of France is\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:"
    requests = [LoglikelihoodRequest(context, f" {letter}") for letter in "ABCD"]
    tf_smollm._prefix = None
    shared = tf_smollm.loglikelihood(requests)
    with settings(tf_smollm, share_prefix=False):
        scratch = tf_smollm.loglikelihood(requests)
    assert [r.logprob for r in shared] == pytest.approx([r.logprob for r in scratch], abs=BATCH_TOL)
    assert [r.is_greedy for r in shared] == [r.is_greedy for r in scratch]
    assert sum(r.evaluated_tokens for r in shared) == len(tf_smollm.tokenize(context))
    assert sum(r.evaluated_tokens for r in scratch) == 4 * len(tf_smollm.tokenize(context))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_continuation_scores_match_log_softmax(dtype: str) -> None:
    """The normaliser and the vectorised sums give fp64 log_softmax's answer, in fp32 and half precision; greedy
    means argmax, so of two tied maxima only the first counts."""
    import torch

    logits = (torch.randn(7, 3000, generator=torch.Generator().manual_seed(0)) * 6).to(getattr(torch, dtype))
    logits[6, 5] = logits[6, 9] = logits[6].max() + 1  # a tie: argmax picks token 5
    reference = torch.log_softmax(logits.double(), dim=-1)
    spans = [[0, 1, 2], [3], [4, 5], [5], [6], [6]]
    targets = [[int(logits[row].argmax()) for row in (0, 1, 2)], [7], [11, int(logits[5].argmax())],
               [int(logits[5].argmax())], [5], [9]]
    scores = _score_continuations(logits.clone(), spans, targets)
    want = [float(sum(reference[row, token] for row, token in zip(span, tokens)))
            for span, tokens in zip(spans, targets)]
    assert [logprob for logprob, _ in scores] == pytest.approx(want, abs=1e-4)
    assert [greedy for _, greedy in scores] == [True, int(logits[3].argmax()) == 7, int(logits[4].argmax()) == 11,
                                                True, True, False]


def test_prompt_probe_rows_end_with_the_last_position(tf_smollm: TransformersProvider) -> None:
    """The pp probe with every logits row computes the same last row as with one (the rows it adds are real)."""
    from transformers import DynamicCache

    tokens = tf_smollm.tokenize("The capital of France is Paris, and the capital of Italy is")
    rows = {n: tf_smollm._forward_one_row(tokens, DynamicCache(config=tf_smollm._model.config), n)
            for n in (1, len(tokens))}
    assert rows[1].shape == rows[len(tokens)].shape == (tf_smollm._model.config.vocab_size,)
    assert np.allclose(rows[len(tokens)].cpu().numpy(), rows[1].cpu().numpy(), atol=1e-4)
    assert tf_smollm.time_prompt(len(tokens), logits_rows=len(tokens)) > 0


def test_evaluator_generates_in_batches_with_one_at_a_time_results(tf_smollm: TransformersProvider,
                                                                    data_dir: Path) -> None:
    """Generation items go to generate_batch several at a time (sorted by length, left-padded) and come back in
    order with the replies, answers and token counts of one-at-a-time generation."""
    from llmlab_fixtures.eval.evaluator import evaluate

    task = get_task("arc_challenge")  # multiple choice by a generated letter: short replies
    docs, shots = load_docs(task, data_dir)[:6], load_docs(task, data_dir, split="train")
    saved = tf_smollm.generation_items_per_call
    runs = []
    try:
        for window in (4, 1):
            tf_smollm.generation_items_per_call = window
            runs.append(evaluate(task, tf_smollm, docs, model_name="t", fewshot_docs=shots, scoring="generate",
                                 num_fewshot=3))
    finally:
        tf_smollm.generation_items_per_call = saved
    batched, single = runs
    assert [i.item_id for i in batched.items] == [i.item_id for i in single.items] == [d["id"] for d in docs]
    assert not any(i.error for i in batched.items)
    assert sum(i.prediction is not None for i in single.items) >= 4  # the replies name letters
    for a, b in zip(batched.items, single.items, strict=True):
        assert (a.response, a.prediction, a.prompt_tokens, a.completion_tokens) == (
            b.response, b.prediction, b.prompt_tokens, b.completion_tokens)
    print(f"\nARC letters, 4 per batch vs 1: {[i.response for i in batched.items]}")


# --- Gemma 3 (GGUF architecture gemma3) -----------------------------------------------------------


def test_tokens_match_llama_cpp_gemma3(tf_gemma: TransformersProvider, lc_gemma: LlamaCppProvider,
                                       data_dir: Path) -> None:
    assert tf_gemma.add_bos is lc_gemma.add_bos is True
    assert tf_gemma.get_model_info().add_bos_token is True
    assert_same_tokens(tf_gemma, lc_gemma, real_prompts(data_dir))


@pytest.mark.skipif(not SLOW, reason="loads Gemma 3's weights (about a minute); set LLMLAB_SLOW_TESTS=1")
def test_gemma3_gguf_loads_and_agrees_with_llama_cpp(tf_gemma: TransformersProvider, lc_gemma: LlamaCppProvider,
                                                     data_dir: Path) -> None:
    tf_gemma.initialize()
    info = tf_gemma.get_model_info()
    assert (info.architecture, info.quantization, info.add_bos_token) == ("gemma3", "dequantised from Q4_K_M", True)
    assert info.parameters == 268_098_176 and info.extra["source"] == "gguf"
    assert info.extra["model_class"] == "Gemma3ForCausalLM"
    items = mc_items(data_dir, "arc_challenge", 10)
    tf_results = tf_gemma.loglikelihood([r for reqs, _ in items for r in reqs])
    agree, deltas, offset = 0, [], 0
    for requests, _ in items:
        mine = tf_results[offset : offset + len(requests)]
        offset += len(requests)
        theirs = lc_gemma.loglikelihood(requests)
        deltas += [abs(a.logprob - b.logprob) for a, b in zip(mine, theirs)]
        agree += predictions(mine, requests)[1] == predictions(theirs, requests)[1]
    print(f"\ngemma3-270m arc_challenge: {len(items)} items, acc_norm agreement {agree / len(items):.2f}, "
          f"mean |Δ logprob| {np.mean(deltas):.3f}")
    assert agree / len(items) >= 0.8 and np.mean(deltas) < MAX_MEAN_ABS_DELTA


# --- check_spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["smollm2-135m", "gemma3-270m", str(embedded_gguf(SMOLLM2))],
                         ids=["smollm2", "gemma3", "smollm2-gguf-path"])
def test_check_spec_accepts_the_embedded_models(target: str) -> None:
    """Each embedded model by alias, and SmolLM2 by its GGUF path (one case each: -k "not gemma" leaves Gemma out)."""
    check_available(spec(f"transformers:{target}"), SETTINGS)


def test_check_spec_missing_gguf_names_the_fix() -> None:
    with pytest.raises(ModelUnavailable) as info:
        check_available(spec("transformers:/nonexistent/model.gguf"), SETTINGS)
    assert str(info.value) == "GGUF file /nonexistent/model.gguf does not exist; check the path after transformers:"


def test_check_spec_repo_not_in_cache_names_the_fix() -> None:
    with pytest.raises(ModelUnavailable) as info:
        check_available(spec("transformers:llmlab-tests/not-downloaded"), SETTINGS)
    assert str(info.value) == (
        "llmlab-tests/not-downloaded is not in the local Hugging Face cache; get it with "
        "`huggingface-cli download llmlab-tests/not-downloaded` (llmlab loads transformers models offline)"
    )
    with pytest.raises(ModelUnavailable) as info:
        create_provider(spec("transformers:pythia-70m"), SETTINGS)
    assert str(info.value) == (
        "model 'pythia-70m' is not available locally for transformers; get it with "
        "`llmlab download pythia-70m` and use transformers:pythia-70m; or "
        "`huggingface-cli download EleutherAI/pythia-70m-deduped`"
    )


def test_check_spec_unsupported_gguf_architecture(tmp_path: Path) -> None:
    import gguf
    import transformers

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelUnavailable) as info:
        check_available(spec(f"transformers:{path}"), SETTINGS)
    assert str(info.value) == (f"transformers {transformers.__version__} cannot load GGUF architecture 'rwkv7' "
                               f"(tiny-rwkv.gguf); run it with llama-cpp:{path} instead")


def test_check_spec_cuda_requested_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelUnavailable) as info:
        check_available(spec("transformers:smollm2-135m"), BackendSettings(device="cuda"))
    assert str(info.value) == (f"--device cuda asks for CUDA, but torch {torch.__version__} sees no CUDA GPU; "
                               "install a CUDA build of torch (see README) or use --device cpu")


# --- through the plugin ---------------------------------------------------------------------------


def test_plugin_runs_arc_challenge_on_transformers(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_challenge", "--models=transformers:smollm2-135m", "--limit=3", f"--data-dir={data_dir}",
        f"--output-dir={out}", f"--threads={THREADS}", f"--device={DEVICE}", "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines(["*llmlab comparison (loglik scoring)*", "dataset (metric)*transformers:smollm2-135m*",
                                 "arc_challenge (acc_norm)*it/s*"])
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [i["backend"] for i in items] == ["transformers"] * 3
    assert all(len(i["loglikelihoods"]) == len(i["loglikelihoods"]) >= 4 for i in items)
    model = json.loads((out / "results.json").read_text())["models"]["transformers:smollm2-135m"]
    assert model["quantization"] == "dequantised from Q4_1" and model["add_bos_token"] is False
    assert model["extra"]["source"] == "gguf" and model["extra"]["device"] == DEVICE


def test_tree_blocks_score_like_one_masked_pass(tf_smollm: TransformersProvider, data_dir: Path) -> None:
    """Packed trees scored through block-sparse attention match the same trees under one masked SDPA pass."""
    requests = [r for task in ("arc_challenge", "hellaswag") for reqs, _ in mc_items(data_dir, task, 12) for r in reqs]
    runs = []
    for blocks in (True, False):
        with settings(tf_smollm, tree_blocks=blocks, _prefix=None):
            runs.append(tf_smollm.loglikelihood(requests))
    for a, b in zip(*runs):
        assert a.logprob == pytest.approx(b.logprob, abs=BATCH_TOL)
        assert (a.is_greedy, a.evaluated_tokens) == (b.is_greedy, b.evaluated_tokens)
    assert predictions(runs[0], requests) == predictions(runs[1], requests)
