"""Harness overhead: the same items through llmlab's evaluator and through bare llama-cpp-python.

llmlab runs the items (prompt building, tokenization, prefix reuse, scoring, metrics) while every llama_decode call
it makes is recorded; the bare run then replays exactly those calls — the same tokens at the same positions, the
same logits rows, a log-softmax per row — through llama-cpp-python's low-level API with nothing else around them.
The ratio llmlab / bare is the harness's overhead (target <= 1.10). Both runs alternate over several rounds.

    python benchmarks/harness_overhead.py --tasks arc_challenge,hellaswag,mmlu,truthfulqa_mc2 --limit 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.tasks import get_task

Call = tuple[int, list[int], list[int]]  # (cache length kept, tokens appended, positions whose logits are read)



class RecordingProvider(LlamaCppProvider):
    """llmlab's llama.cpp provider, noting every decode call it makes."""

    calls: list[Call]

    def _decode(self, tokens, outputs, on_logits):  # type: ignore[no-untyped-def]
        self.calls.append((len(self._cached), list(tokens), list(outputs)))
        return super()._decode(tokens, outputs, on_logits)


def run_llmlab(provider: RecordingProvider, task_name: str, limit: int, data_dir: Path, shots: int | None) -> float:
    task = get_task(task_name)
    docs = load_docs(task, data_dir)[:limit]
    n = task.num_fewshot if shots is None else shots
    fewshot = load_docs(task, data_dir, split=task.fewshot_split) if n and task.fewshot_split else None
    provider.reset_cache()
    provider.calls = []
    started = time.perf_counter()
    evaluate(task, provider, docs, model_name="overhead", fewshot_docs=fewshot, scoring="loglik", num_fewshot=shots)
    return time.perf_counter() - started


def run_bare(provider: LlamaCppProvider, calls: Sequence[Call]) -> float:
    """Replay ``calls`` with llama-cpp-python's ctypes API: seq_rm, fill the batch, llama_decode, read logits."""
    lib, ctx, mem, batch, n_vocab = provider._lib, provider._ctx, provider._mem, provider._batch, provider.n_vocab
    lib.llama_memory_clear(mem, True)
    started = time.perf_counter()
    for kept, tokens, outputs in calls:
        lib.llama_memory_seq_rm(mem, 0, kept, -1)
        wanted = set(outputs)
        for lo in range(0, len(tokens), provider.n_batch):
            chunk = tokens[lo : lo + provider.n_batch]
            rows = []
            for i, token in enumerate(chunk):
                pos = kept + lo + i
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = pos in wanted
                if pos in wanted:
                    rows.append(i)
            batch.n_tokens = len(chunk)
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i in rows:
                row = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                m = row.max()
                _ = row[0] - m - np.log(np.exp(row - m).sum())
    elapsed = time.perf_counter() - started
    lib.llama_memory_clear(mem, True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu,truthfulqa_mc2")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    # one sequence at a time: the replay below is of single-stream calls (streams are timed by reuse_speed.py)
    provider = RecordingProvider(embedded_gguf(SMOLLM2), "smollm2-135m", n_threads=args.threads, parallel=1)
    provider.initialize()
    print(f"SmolLM2-135M Q4_1, llama.cpp, {args.threads} threads, first {args.limit} items, "
          f"median of {args.rounds} rounds")
    print(f"{'task':16} {'tokens':>7} {'llmlab s':>9} {'bare s':>8} {'ratio':>6}")
    for task_name in args.tasks.split(","):
        ours, bare = [], []
        for _ in range(args.rounds):
            ours.append(run_llmlab(provider, task_name, args.limit, args.data_dir, args.num_fewshot))
            bare.append(run_bare(provider, provider.calls))
        tokens = sum(len(t) for _, t, _ in provider.calls)
        a, b = statistics.median(ours), statistics.median(bare)
        print(f"{task_name:16} {tokens:7d} {a:9.2f} {b:8.2f} {a / b:6.3f}", flush=True)
    provider.close()


if __name__ == "__main__":
    main()
