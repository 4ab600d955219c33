"""Score ARC-Challenge with SmolLM2 twice (prefix-cache reuse vs from scratch) and compare speed and results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.providers.base import LoglikelihoodRequest, LoglikelihoodResult
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider


def load_arc(data_dir: Path, limit: int) -> list[list[LoglikelihoodRequest]]:
    """lm-eval's arc_challenge prompt: "Question: {q}\\nAnswer:" scored against " {choice}"."""
    items = []
    with (data_dir / "arc" / "ARC-Challenge" / "test.jsonl").open() as fh:
        for line in fh:
            if len(items) >= limit:
                break
            row = json.loads(line)
            context = f"Question: {row['question']}\nAnswer:"
            items.append([LoglikelihoodRequest(context, " " + text) for text in row["choices"]["text"]])
    return items


def run(
    provider: LlamaCppProvider, items: list[list[LoglikelihoodRequest]]
) -> tuple[float, list[list[LoglikelihoodResult]]]:
    provider.reset_cache()
    start = time.perf_counter()
    results = [provider.loglikelihood(reqs) for reqs in items]
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=100, help="ARC-Challenge test items to score")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="offline datasets directory")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    items = load_arc(args.data_dir, args.limit)
    path = embedded_gguf(SMOLLM2)
    timings = {}
    with (
        LlamaCppProvider(path, "smollm2-135m", n_ctx=2048, n_threads=args.threads) as shared,
        LlamaCppProvider(path, "smollm2-135m", n_ctx=2048, n_threads=args.threads, reuse_prefix=False) as scratch,
    ):
        run(shared, items[:2])  # warm up both (page in weights, build graphs)
        run(scratch, items[:2])
        for label, provider in (("prefix reuse", shared), ("from scratch", scratch)):
            seconds, results = run(provider, items)
            timings[label] = (seconds, results)

    (t_shared, r_shared), (t_scratch, r_scratch) = timings["prefix reuse"], timings["from scratch"]
    pred_shared = [int(np.argmax([r.logprob for r in rs])) for rs in r_shared]
    pred_scratch = [int(np.argmax([r.logprob for r in rs])) for rs in r_scratch]
    agree = sum(a == b for a, b in zip(pred_shared, pred_scratch, strict=True))
    max_diff = max(
        abs(a.logprob - b.logprob) for x, y in zip(r_shared, r_scratch, strict=True) for a, b in zip(x, y, strict=True)
    )
    n = len(items)
    n_requests = sum(len(i) for i in items)
    print(f"ARC-Challenge test, {n} items, {n_requests} requests, SmolLM2-135M-Instruct Q4_1 ({path.name})")
    for label, (seconds, results) in timings.items():
        tokens = sum(r.evaluated_tokens for rs in results for r in rs)
        print(f"  {label:13s}: {n / seconds:7.2f} items/s  {seconds:7.2f} s  {tokens / n:7.1f} tokens evaluated/item")
    print(f"  speed ratio (reuse / scratch): {t_scratch / t_shared:.2f}x")
    print(f"  predictions agree: {agree}/{n}; max |logprob diff|: {max_diff:.2e}")
    if agree != n:
        raise SystemExit("predictions differ between prefix reuse and from-scratch scoring")


if __name__ == "__main__":
    main()
