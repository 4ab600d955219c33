"""GSM8K generation speed of llmlab's continuous batching, per backend and setting.

llama.cpp: one stream (``--parallel-sequences 1``) against 4 and 8 streams refilled as replies end, and 8 streams
with fixed exemplars (the prefix decoded once and copied). transformers: one row against 8 rows refilled as replies
end, and 8 rows with fixed exemplars. For each setting this prints items/s, prompt tokens evaluated per item,
generated tokens/s, the strict exact match, and how many replies equal the backend's first setting. The comparison
with lm-evaluation-harness on the same items is ``lm_eval_compare.py --tasks gsm8k`` (benchmarks/README.md).

    python benchmarks/generation_speed.py --limit 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, smollm2_provider

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.records import TaskRun
from llmlab_fixtures.providers.base import Provider
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.tasks import get_task


def settings(backend: str) -> list[tuple[str, bool, int]]:
    """(label, fixed exemplars, streams or rows side by side) to time for a backend."""
    if backend == "llama-cpp":
        return [("1 stream", False, 1), ("4 streams", False, 4), ("8 streams", False, 8), ("8 streams, fixed", True, 8)]
    return [("1 row", False, 1), ("8 rows", False, 8), ("8 rows, fixed", True, 8)]


def configure(provider: Provider, side_by_side: int) -> None:
    """Streams (llama.cpp) or rows (transformers) side by side, and the prompts of one evaluator call."""
    if isinstance(provider, LlamaCppProvider):
        provider.parallel = side_by_side
        provider.reset_cache()
    else:
        provider.generation_rows = side_by_side  # type: ignore[attr-defined]
        provider.generation_items_per_call = 4 * side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--backends", default="llama-cpp,transformers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    task = get_task("gsm8k")
    docs = load_docs(task, args.data_dir)[: args.limit]
    train = load_docs(task, args.data_dir, split="train")
    print(f"SmolLM2-135M-Instruct, GSM8K {args.shots}-shot, first {len(docs)} items, {args.threads} threads")
    print(f"{'backend':12} {'setting':22} {'it/s':>6} {'prompt tok/item':>15} {'gen tok/s':>9} {'em strict':>9} "
          f"{'same answers':>12}")
    for backend in args.backends.split(","):
        provider = smollm2_provider(backend, args.threads)
        provider.initialize()
        first: TaskRun | None = None
        for label, fixed, side_by_side in settings(backend):
            configure(provider, side_by_side)
            started = time.perf_counter()
            run = evaluate(task, provider, docs, model_name=backend, fewshot_docs=train, scoring="generate",
                           num_fewshot=args.shots, fixed_fewshot=fixed)
            wall = time.perf_counter() - started
            first = first or run
            evaluated = sum(i.evaluated_tokens for i in run.items) / len(run.items)
            generated = sum(i.completion_tokens for i in run.items)
            strict = next(m.value for m in run.metrics if m.name == "exact_match_strict")
            same = sum(a.response == b.response for a, b in zip(run.items, first.items, strict=True))
            print(f"{backend:12} {label:22} {len(docs) / wall:6.3f} {evaluated:15.0f} {generated / wall:9.1f} "
                  f"{strict:9.3f} {same:5d}/{len(docs):<6d}", flush=True)
        provider.close()


if __name__ == "__main__":
    main()
