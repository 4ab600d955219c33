"""Items/s and tokens evaluated per item, before and after prefix reuse, for llama.cpp and transformers.

"before" scores every request from scratch (no KV-cache reuse, one item per call); "after" is llmlab's default:
an item's context once for all its choices, prefixes shared across items (TruthfulQA's primer, MMLU's description
and few-shot block) kept in the KV cache, and for transformers several items' contexts batched in one call.
The limit column is the backend's prompt-processing rate (pp512, measured here) divided by the tokens evaluated per
item after reuse: the items/s a run would reach if the model ran nothing else. pp512 computes one logits row per 512
tokens, while exact scoring needs a full-vocabulary row for every continuation token, so a second limit charges the
rows an exact scorer cannot avoid (one per distinct token prefix that predicts a continuation token) at the rate of
pp512 with every row's logits. Their quotient, the "ceiling", is the highest after/limit an exact scorer reaches
even with no overhead at all. Scores before and after must agree.

A shared VM's speed drifts by a fifth from minute to minute, so "after" runs ``--rounds`` times, each run followed by
pp512 probes, and the table shows medians: the limit is measured in the same minutes as the runs it judges
(llama-bench likewise reports the average of its repetitions, not the best).

    python benchmarks/reuse_speed.py --tasks arc_challenge:0:50,hellaswag:0:50,mmlu:5:30,truthfulqa_mc2:0:30
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, smollm2_provider

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.records import TaskRun
from llmlab_fixtures.providers.base import LoglikelihoodRequest, Provider
from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider
from llmlab_fixtures.providers.transformers.provider import TransformersProvider
from llmlab_fixtures.tasks import get_task
from llmlab_fixtures.tasks.definitions import TaskDefinition


def configure(provider: Provider, reuse: bool) -> None:
    """Switch prefix reuse (and, for transformers, multi-item calls) on or off."""
    if isinstance(provider, LlamaCppProvider):
        provider.reuse_prefix = reuse
        provider.reset_cache()
    else:
        assert isinstance(provider, TransformersProvider)
        provider.share_prefix = reuse
        provider._prefix = None
        provider.loglik_items_per_call = type(provider).loglik_items_per_call if reuse else 1


class RequestLog:
    """Keeps the requests ``provider.loglikelihood`` receives (calls straight through to it)."""

    def __init__(self, provider: Provider) -> None:
        self.calls: list[list[LoglikelihoodRequest]] = []
        self._provider, self._score = provider, provider.loglikelihood
        provider.loglikelihood = self  # type: ignore[method-assign]

    def __call__(self, requests: list[LoglikelihoodRequest]) -> list:
        self.calls.append(list(requests))
        return self._score(requests)

    def logits_rows(self) -> int:
        """Rows an exact scorer must compute: per call, one for each distinct token prefix that predicts a
        continuation token (shared prefixes, e.g. MMLU's one-letter answers, count once)."""
        encode = self._provider.encode_pair  # type: ignore[attr-defined]
        rows = 0
        for requests in self.calls:
            prefixes: set[tuple[int, ...]] = set()
            for request in requests:
                context, continuation = encode(request.context, request.continuation)
                seq = context + continuation
                prefixes.update(tuple(seq[:end]) for end in range(len(context), len(seq)))
            rows += len(prefixes)
        return rows

    def detach(self) -> None:
        del self._provider.loglikelihood


def timed_run(provider: Provider, reuse: bool, task: TaskDefinition, docs: list, fewshot: list | None,
              shots: int) -> tuple[float, TaskRun]:
    """Seconds to score ``docs`` from a cold cache with prefix reuse on or off, and the run."""
    configure(provider, reuse)
    started = time.perf_counter()
    run = evaluate(task, provider, docs, model_name=provider.backend, fewshot_docs=fewshot, scoring="loglik",
                   num_fewshot=shots)
    return time.perf_counter() - started, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arc_challenge:0:50,hellaswag:0:50,mmlu:5:30,truthfulqa_mc2:0:30",
                        help="task:shots:items, comma-separated")
    parser.add_argument("--backends", default="llama-cpp,transformers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3, help="runs after reuse per task, each followed by pp probes")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF), {args.threads} threads")
    print(f"{'backend':12} {'task':16} {'shots':>5} {'n':>4} {'it/s before':>11} {'it/s after':>10} "
          f"{'after range':>11} {'speed-up':>8} "
          f"{'tok/item before':>15} {'tok/item after':>14} {'pp512 tok/s':>11} {'limit it/s':>10} "
          f"{'after/limit':>11} {'rows/item':>9} {'pp512 all-rows tok/s':>20} {'limit w/ rows':>13} "
          f"{'after/limit w/ rows':>19} {'ceiling':>7} {'same preds':>10} {'acc':>7} {'peak RSS MB':>11}")
    for backend in args.backends.split(","):
        provider = smollm2_provider(backend, args.threads)
        provider.initialize()
        provider.time_prompt(512)  # warm-up
        for spec in args.tasks.split(","):
            name, shots, n = spec.split(":")
            task = get_task(name)
            docs = load_docs(task, args.data_dir)[: int(n)]
            fewshot = load_docs(task, args.data_dir, split=task.fewshot_split) if int(shots) and task.fewshot_split \
                else None
            before_s, run_before = timed_run(provider, False, task, docs, fewshot, int(shots))
            after_s, pp_s, pp_rows_s = [], [], []
            for round_ in range(args.rounds):
                log = RequestLog(provider) if round_ == 0 else None  # every round sends the same requests
                elapsed, run_after = timed_run(provider, True, task, docs, fewshot, int(shots))
                if log is not None:
                    log.detach()
                    rows = log.logits_rows() / len(docs)
                after_s.append(elapsed)
                for _ in range(2):
                    pp_s.append(provider.time_prompt(512))
                    pp_rows_s.append(provider.time_prompt(512, logits_rows=512))
            before, after = len(docs) / before_s, len(docs) / statistics.median(after_s)
            pp, pp_rows = 512 / statistics.median(pp_s), 512 / statistics.median(pp_rows_s)
            tok_before = sum(r.evaluated_tokens for r in run_before.items) / len(docs)
            tok_after = sum(r.evaluated_tokens for r in run_after.items) / len(docs)
            same = sum(a.prediction == b.prediction for a, b in zip(run_before.items, run_after.items))
            limit = pp / tok_after
            limit_rows = 1 / ((tok_after - rows) / pp + rows / pp_rows)
            spread = f"{len(docs) / max(after_s):.2f}-{len(docs) / min(after_s):.2f}"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{backend:12} {name:16} {shots:>5} {len(docs):4d} {before:11.2f} {after:10.2f} {spread:>11} "
                  f"{after / before:7.1f}x {tok_before:15.0f} {tok_after:14.0f} {pp:11.0f} {limit:10.2f} "
                  f"{after / limit:11.2f} {rows:9.0f} {pp_rows:20.0f} {limit_rows:13.2f} {after / limit_rows:19.2f} "
                  f"{limit_rows / limit:7.2f} {same:5d}/{len(docs):<4d} {run_after.metrics[0].value:7.3f} {peak:11.0f}",
                  flush=True)
        provider.close()


if __name__ == "__main__":
    main()
