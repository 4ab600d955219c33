"""Throughput of one model behind one server against a fleet of N servers (``openai-compat`` with several URLs).

    python benchmarks/fleet_speed.py --servers 2 --items 40 --task arc_challenge

Starts N vLLM-semantics stand-ins (``python -m llmlab_fixtures.testing.vllm_server``, one thread each, the embedded
SmolLM2-135M) as separate processes, scores the same items by log-likelihood through one server and through the
fleet, and prints items/s, the ratio, and how many requests each server answered. Predictions must match.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack

from bench_common import default_data_dir

from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.models.specs import parse_specs
from llmlab_fixtures.providers import BackendSettings, create_provider
from llmlab_fixtures.tasks import get_task
from llmlab_fixtures.testing.openai_server import free_port


def start_server(stack: ExitStack, threads: int) -> str:
    """A stand-in in its own process; its base URL once ``/v1/models`` answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llmlab_fixtures.testing.vllm_server", "--model",
                                str(embedded_gguf(SMOLLM2)), "--served-model-name", "smollm2", "--port", str(port),
                                "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(process.wait, 15)
    stack.callback(process.terminate)
    url = f"http://127.0.0.1:{port}/v1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(600):
        try:
            with opener.open(f"{url}/models", timeout=2):
                return url
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the stand-in at {url} did not start")


def score(urls: list[str], task_name: str, items: int, concurrency: int) -> tuple[float, list[int], dict]:
    """Seconds, predictions and the provider's info for ``items`` items through the servers at ``urls``."""
    task = get_task(task_name)
    docs = load_docs(task, default_data_dir())[:items]
    spec, = parse_specs(",".join(f"openai-compat:{url}#smollm2" for url in urls), builtin_models())
    provider = create_provider(spec, BackendSettings(concurrency=concurrency, scoring="loglik"))
    provider.initialize()
    started = time.perf_counter()
    run = evaluate(task, provider, docs, model_name=spec.label, fewshot_docs=None, scoring="loglik", num_fewshot=0)
    seconds = time.perf_counter() - started
    info = provider.get_model_info().extra
    provider.close()
    return seconds, [r.prediction for r in run.items], info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--task", default="arc_challenge")
    parser.add_argument("--threads", type=int, default=1, help="threads per server")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight per server")
    args = parser.parse_args()
    with ExitStack() as stack:
        urls = [start_server(stack, args.threads) for _ in range(args.servers)]
        one_s, one, _ = score(urls[:1], args.task, args.items, args.concurrency)
        fleet_s, fleet, info = score(urls, args.task, args.items, args.concurrency)
    print(f"{args.task}, {args.items} items, SmolLM2-135M, {args.threads} thread(s) a server, "
          f"--concurrency {args.concurrency}")
    print(f"one server:        {one_s:7.1f} s  {args.items / one_s:6.2f} items/s")
    print(f"fleet of {args.servers}:        {fleet_s:7.1f} s  {args.items / fleet_s:6.2f} items/s  "
          f"({one_s / fleet_s:.2f}x)")
    print(f"requests per server: {info.get('served')}; same predictions: {one == fleet}")
    return 0 if one == fleet else 1


if __name__ == "__main__":
    sys.exit(main())
