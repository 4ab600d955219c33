"""What one llama_decode call costs on top of its tokens, and how much of a task's time goes to that fixed cost.

On a CPU a call reads every weight once however few tokens it carries, so its time is about ``a + b x tokens``.
This script fits ``a`` (ms per call) and ``b`` (ms per token) from calls of 1 to 64 tokens after a cached context,
shows that several KV-cache streams in one call cost what one stream with all their tokens costs (so streams save
whole calls), and then runs a task, recording its calls, to split its decode time into the calls' fixed part and
the tokens' part, both at that fit and at a fit over the run's own calls (ms per call, per stream in a call, per
token, per logits row: a stream reads its own KV cache, and between a run's calls other work evicts the weights
from the CPU's caches). ``plan_runs`` weighs a call as ``CALL_COST_TOKENS`` tokens.

    python benchmarks/call_cost.py --task truthfulqa_mc2 --items 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, smollm2_provider

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.providers.llama_cpp.streams import CALL_COST_TOKENS, LlamaStreams, StreamJob, skip_row
from llmlab_fixtures.providers.tokens import probe_tokens
from llmlab_fixtures.tasks import get_task


def one_sequence_ms(provider: LlamaCppProvider, context: list[int], n: int, rounds: int) -> float:
    """Median ms to decode ``n`` new tokens (one logits row) after ``context``, which the main cache holds."""
    times = []
    for _ in range(rounds):
        provider._keep_prefix(context, len(context))
        tokens = probe_tokens(n, provider.n_vocab, seed=n)
        started = time.perf_counter()
        provider._decode(tokens, [len(context) + n - 1], skip_row)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def streams_ms(streams: LlamaStreams, context: list[int], k: int, n: int, rounds: int) -> float:
    """Median ms of one call in which ``k`` streams each decode ``n`` tokens (one row each) after ``context``,
    which every stream holds."""
    times = []
    for _ in range(rounds):
        jobs = [StreamJob(s, len(context), probe_tokens(n, streams.n_vocab, seed=s), {len(context) + n - 1},
                          skip_row) for s in range(k)]
        started = time.perf_counter()
        streams.run(jobs)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


class DecodeCounter:
    """Records each llama_decode call: its tokens, streams (sequence ids), logits rows and seconds (wraps the
    function on the llama-cpp-python module)."""

    def __init__(self, lib: Any) -> None:
        self.lib, self.decode = lib, lib.llama_decode
        self.records: list[tuple[int, int, int, float]] = []
        lib.llama_decode = self

    def __call__(self, ctx: Any, batch: Any) -> int:
        n = batch.n_tokens
        streams = len({batch.seq_id[i][0] for i in range(n)})
        rows = sum(1 for i in range(n) if batch.logits[i])
        started = time.perf_counter()
        rc = self.decode(ctx, batch)
        self.records.append((n, streams, rows, time.perf_counter() - started))
        return rc

    def detach(self) -> None:
        self.lib.llama_decode = self.decode

    def fit(self) -> tuple[float, float, float, float]:
        """Least-squares ms per call, per stream in a call, per token and per logits row over the recorded calls."""
        data = np.array(self.records)
        design = np.column_stack([np.ones(len(data)), data[:, 1], data[:, 0], data[:, 2]])
        coef, *_ = np.linalg.lstsq(design, 1000 * data[:, 3], rcond=None)
        return float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="truthfulqa_mc2")
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--context", type=int, default=200, help="cached tokens before each timed call")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    provider = smollm2_provider("llama-cpp", args.threads)
    assert isinstance(provider, LlamaCppProvider)
    provider.initialize()
    provider.time_prompt(512)  # warm-up
    context = probe_tokens(args.context, provider.n_vocab, seed=args.context)
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF) on llama.cpp, {args.threads} threads, {args.context} tokens cached")

    provider.reset_cache()
    provider._decode(context, [], skip_row)
    points = [(n, one_sequence_ms(provider, context, n, args.rounds)) for n in (1, 2, 4, 8, 16, 32, 64)]
    print("one sequence:  " + "  ".join(f"{n} tok {ms:.1f} ms" for n, ms in points))
    per_token, per_call = statistics.linear_regression([n for n, _ in points], [ms for _, ms in points])
    print(f"fit: {per_call:.1f} ms per call + {per_token:.2f} ms per token; a call costs "
          f"{per_call / per_token:.1f} tokens (plan_runs assumes {CALL_COST_TOKENS})")

    streams = provider._streams_for(args.context + 17)  # the context and the longest stream job (16 tokens)
    assert streams is not None, "no room for KV-cache streams"
    for s in range(streams.n_streams):
        streams.run([StreamJob(s, 0, context, set(), skip_row)])
    k = streams.n_streams
    for n in (8, 16):
        together = streams_ms(streams, context, k, n, args.rounds)
        alone = streams_ms(streams, context, 1, n, args.rounds)
        whole = one_sequence_ms(provider, context, k * n, args.rounds)
        print(f"{k} streams x {n} tokens in one call: {together:.1f} ms; one stream of {k * n} tokens: {whole:.1f} ms;"
              f" {k} calls of {n} tokens: {k * alone:.1f} ms")

    task = get_task(args.task)
    docs = load_docs(task, args.data_dir)[: args.items]
    provider.reset_cache()
    counter = DecodeCounter(provider._lib)
    started = time.perf_counter()
    evaluate(task, provider, docs, model_name=provider.backend, fewshot_docs=None, scoring="loglik", num_fewshot=0)
    elapsed = time.perf_counter() - started
    counter.detach()
    tokens, stream_jobs, rows, seconds = (sum(column) for column in zip(*counter.records, strict=True))
    calls, n = len(counter.records), len(docs)
    print(f"{args.task}, {n} items: {n / elapsed:.2f} items/s; per item {calls / n:.2f} calls, {stream_jobs / n:.1f} "
          f"streams in them, {tokens / n:.1f} tokens ({tokens / calls:.1f} per call), {rows / n:.1f} logits rows; "
          f"llama_decode {100 * seconds / elapsed:.0f}% of the run")
    fixed_at_fit = calls * per_call / 1000
    print(f"  at the fit above, the calls' fixed cost is {fixed_at_fit:.2f} s = "
          f"{100 * fixed_at_fit / elapsed:.0f}% of the run")
    call_ms, stream_ms, token_ms, row_ms = counter.fit()
    fixed_in_run = (calls * call_ms + stream_jobs * stream_ms) / 1000
    print(f"  fitted on the run's own calls: {call_ms:.1f} ms a call + {stream_ms:.2f} ms a stream in it + "
          f"{token_ms:.2f} ms a token + {row_ms:.2f} ms a logits row; calls and streams {fixed_in_run:.2f} s = "
          f"{100 * fixed_in_run / elapsed:.0f}% of the run")
    provider.close()


if __name__ == "__main__":
    main()
