"""ARC-Challenge items/s of the transformers backend at batch sizes 1, 8 and auto, beside llama.cpp on the same GGUF.

Two ways of feeding the model are timed: ``per item`` (one loglikelihood call per item, as the evaluator does,
so a batch holds at most that item's choices) and ``all items`` (every request in one call, so batches span
items). llama.cpp is timed per item with its prefix cache. Example::

    python benchmarks/transformers_batch_speed.py --limit 40 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.prompts import ExemplarSampler, loglikelihood_requests
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import parse_spec
from llmlab_fixtures.providers import BackendSettings
from llmlab_fixtures.providers.base import LoglikelihoodRequest, LoglikelihoodResult
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.providers.transformers.provider import TransformersProvider, make_provider
from llmlab_fixtures.tasks import get_task


def arc_items(data_dir: Path, limit: int, num_fewshot: int | None) -> list[list[LoglikelihoodRequest]]:
    """lm-eval's arc_challenge requests for the first ``limit`` test items (the task's shots unless overridden)."""
    task = get_task("arc_challenge")
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    fewshot = load_docs(task, data_dir, split=task.fewshot_split) if shots else None
    sampler = ExemplarSampler(task, fewshot, shots)
    return [loglikelihood_requests(task, doc, sampler.exemplars(doc)) for doc in load_docs(task, data_dir)[:limit]]


def time_per_item(provider: TransformersProvider | LlamaCppProvider,
                  items: list[list[LoglikelihoodRequest]]) -> tuple[float, list[list[LoglikelihoodResult]]]:
    start = time.perf_counter()
    results = [provider.loglikelihood(reqs) for reqs in items]
    return time.perf_counter() - start, results


def time_all_items(provider: TransformersProvider,
                   items: list[list[LoglikelihoodRequest]]) -> tuple[float, list[list[LoglikelihoodResult]]]:
    flat = [r for reqs in items for r in reqs]
    start = time.perf_counter()
    scored = provider.loglikelihood(flat)
    seconds = time.perf_counter() - start
    out, offset = [], 0
    for reqs in items:
        out.append(scored[offset : offset + len(reqs)])
        offset += len(reqs)
    return seconds, out


def choices(results: list[list[LoglikelihoodResult]]) -> list[int]:
    return [int(np.argmax([r.logprob for r in rs])) for rs in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40, help="ARC-Challenge test items to score")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="offline datasets directory")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp")
    parser.add_argument("--device", default="auto", help="transformers device: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--model", default="smollm2-135m", help="registered alias with a GGUF")
    parser.add_argument("--sizes", default="1,8,auto", help="comma-separated batch sizes (auto = None)")
    args = parser.parse_args()

    shots = get_task("arc_challenge").num_fewshot if args.num_fewshot is None else args.num_fewshot
    items = arc_items(args.data_dir, args.limit, shots)
    n, n_requests = len(items), sum(len(i) for i in items)
    spec = parse_spec(f"transformers:{args.model}", builtin_models())
    tf = make_provider(spec, BackendSettings(threads=args.threads, device=args.device))
    started = time.perf_counter()
    tf.initialize()
    info = tf.get_model_info()
    print(f"ARC-Challenge test, {n} items, {n_requests} requests, {shots}-shot; "
          f"{info.name} ({info.quantization}, {info.extra['device']}, {info.extra['dtype']}), "
          f"loaded in {time.perf_counter() - started:.1f} s")
    time_per_item(tf, items[:2])  # warm-up
    reference: list[int] | None = None
    for size_text in args.sizes.split(","):
        size = None if size_text.strip() == "auto" else int(size_text)
        tf.batch_size = size
        for label, run in (("per item", time_per_item), ("all items", time_all_items)):
            seconds, results = run(tf, items)
            picked = choices(results)
            reference = reference or picked
            same = sum(a == b for a, b in zip(picked, reference))
            print(f"  transformers batch {size_text:>4s} {label:9s}: {n / seconds:6.2f} items/s  {seconds:7.2f} s  "
                  f"(predictions equal to the first run: {same}/{n})")
    gguf = Path(info.path or "")
    tf.close()
    with LlamaCppProvider(gguf, f"llama-cpp:{args.model}", n_ctx=2048, n_threads=args.threads) as lc:
        time_per_item(lc, items[:2])
        lc.reset_cache()
        seconds, results = time_per_item(lc, items)
        same = sum(a == b for a, b in zip(choices(results), reference or []))
        print(f"  llama.cpp (prefix cache) per item   : {n / seconds:6.2f} items/s  {seconds:7.2f} s  "
              f"(predictions equal to transformers: {same}/{n})")


if __name__ == "__main__":
    main()
