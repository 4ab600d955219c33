"""GSM8K generation speed: per-item exemplars vs fixed exemplars, and one prompt per call vs batched prompts.

lm-eval draws GSM8K's few-shot exemplars per item (llmlab's default too, for comparable scores); with
``--fixed-fewshot`` every item gets the same exemplars, so llama.cpp keeps that prefix in its KV cache and runs only
each question. The transformers backend generates ``generation_items_per_call`` prompts as one left-padded batch
(one batched forward pass per new token) instead of one prompt at a time. For each setting this prints items/s,
prompt tokens evaluated per item, generated tokens/s, the strict exact match, and how many answers equal the
first setting's.

    python benchmarks/generation_speed.py --limit 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, smollm2_provider

from llmlab_fixtures.datasets import load_docs
from llmlab_fixtures.evaluator import evaluate
from llmlab_fixtures.providers.llama_cpp import LlamaCppProvider
from llmlab_fixtures.records import TaskRun
from llmlab_fixtures.tasks import get_task


def settings(backend: str) -> list[tuple[str, bool, int]]:
    """(label, fixed exemplars, prompts per call) to time for a backend."""
    if backend == "llama-cpp":
        return [("per-item exemplars", False, 1), ("fixed exemplars", True, 1)]
    return [("1 prompt per call", False, 1), ("8 prompts per call", False, 8), ("8 per call + fixed", True, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=16)
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
        for label, fixed, per_call in settings(backend):
            provider.generation_items_per_call = per_call
            if isinstance(provider, LlamaCppProvider):
                provider.reset_cache()
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
