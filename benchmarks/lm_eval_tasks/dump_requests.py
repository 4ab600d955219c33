"""Print, as JSON lines, the requests lm-evaluation-harness builds for tasks (no model is loaded).

Runs in lm-eval's virtual environment: ``<lm-eval python> dump_requests.py --include-path DIR --task NAME
[--num-fewshot N] [--limit N]``. One line per item: the leaf task, ``doc_id``, the doc's ``id``/``ind``/``subject``
(to match llmlab's item ids), and ``requests``, a list of [context, continuation] (generation: [prompt, null]) in
choice order. lm_eval_compare.py --check-prompts compares them with llmlab's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lm_eval.tasks import TaskManager


def item_lines(name: str, task: Any, limit: int | None) -> list[dict[str, Any]]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    items: dict[int, dict[str, Any]] = {}
    for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        doc = instance.doc
        item = items.setdefault(instance.doc_id, {
            "task": name, "doc_id": instance.doc_id, "requests": [],
            **{field: doc[field] for field in ("id", "ind", "subject") if field in doc}})
        context, second = instance.arguments[0], instance.arguments[1]
        item["requests"].append([context, second if isinstance(second, str) else None])
    return list(items.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--include-path", required=True, help="directory of the generated task YAMLs")
    parser.add_argument("--task", required=True, help="lm-eval task or group name")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--fewshot-seed", type=int, default=1234, help="as lm-eval's --seed (default 1234)")
    args = parser.parse_args(argv)
    manager = TaskManager(include_path=args.include_path)
    for name, task in manager.load([args.task])["tasks"].items():
        if args.num_fewshot is not None:
            task.set_config(key="num_fewshot", value=args.num_fewshot)
        task.set_fewshot_seed(seed=args.fewshot_seed)  # what lm-eval's evaluator does before building requests
        for item in item_lines(name, task, args.limit):
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
