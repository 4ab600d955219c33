"""Fail CI when a results file is missing or a (model, dataset) scored no items."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

DATASETS = ("arc_challenge", "arc_easy", "gsm8k", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
FILES = ("items.jsonl", "summary.csv", "summary.md", "results.json")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--models", required=True)
    args = parser.parse_args()
    problems = [f"missing {name}" for name in FILES if not (args.run_dir / name).is_file()]
    if problems:
        print("; ".join(problems))
        return 1
    items: dict[tuple[str, str], int] = {}
    for line in (args.run_dir / "items.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["error"] is None:
            items[(row["model"], row["dataset"])] = items.get((row["model"], row["dataset"]), 0) + 1
    with (args.run_dir / "summary.csv").open() as handle:
        summary = {(r["model"], r["dataset"]) for r in csv.DictReader(handle)}
    for model in args.models.split(","):
        for dataset in DATASETS:
            if not items.get((model, dataset)):
                problems.append(f"{model} scored no {dataset} items")
            if (model, dataset) not in summary:
                problems.append(f"{model} {dataset} missing from summary.csv")
    loads = json.loads((args.run_dir / "results.json").read_text())["model_loads"]
    problems += [f"{m} was loaded {len(v)} times" for m, v in loads.items() if len(v) != 1]
    print("\n".join(problems) if problems else f"results complete: {sum(items.values())} items")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
