#!/usr/bin/env python
"""The original command line, kept working as a thin wrapper over `pytest bench`.

    python run_benchmarks.py --model smollm2-135m --dataset truthfulness --limit 100
    python run_benchmarks.py --models smollm2-135m,gemma3-270m --all-datasets --parallel --export-format markdown
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent / "bench"
DATASET_MODULES = {
    "truthfulness": "test_truthfulqa.py",
    "truthfulqa": "test_truthfulqa.py",
    "arc": "test_arc.py",
    "gsm8k": "test_gsm8k.py",
    "mmlu": "test_mmlu.py",
    "hellaswag": "test_hellaswag.py",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a model spec (repeatable)")
    parser.add_argument("--models", default=None, help="comma-separated model specs")
    parser.add_argument("--dataset", action="append", default=[],
                        help=f"dataset to run (repeatable): {', '.join(DATASET_MODULES)}")
    parser.add_argument("--all-datasets", action="store_true", help="run all five datasets")
    parser.add_argument("--limit", type=int, default=None, help="items per dataset")
    parser.add_argument("--data-dir", default=None, help="local dataset mirror (default $LLMLAB_DATA_DIR or the Hub)")
    parser.add_argument("--output-dir", default=None, help="results directory")
    parser.add_argument("--export-format", default=None, help="csv, json, markdown (comma-separated)")
    parser.add_argument("--local-only", action="store_true", help="local models only")
    parser.add_argument("--use-local", action="store_true", help="prefer the local form of a model")
    parser.add_argument("--parallel", nargs="?", const="auto", default=None, metavar="N",
                        help="run models in parallel with pytest-xdist (-n N, default auto)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--scoring", default=None, help="auto, loglik or generate")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu-layers", default=None)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--checkpoint", default=None, metavar="FILE",
                        help="item checkpoint file; the same command resumes (default .llmlab/checkpoint.sqlite)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    parser.add_argument("--html", default=None, metavar="FILE", help="also write a pytest-html report")
    parser.add_argument("--include-cost-analysis", action="store_true",
                        help="add the total cost of ownership: monthly cost of local vs cloud models, break-even")
    return parser


def pytest_args(args: argparse.Namespace) -> list[str]:
    """Translate the old options into a `pytest bench` command line; exits with one line on a bad dataset."""
    datasets = list(DATASET_MODULES) if args.all_datasets else [d.lower() for d in args.dataset]
    if not datasets:
        sys.exit("run_benchmarks.py: give --dataset NAME (one of "
                 f"{', '.join(DATASET_MODULES)}) or --all-datasets")
    modules: list[str] = []
    for name in datasets:
        if name not in DATASET_MODULES:
            close = difflib.get_close_matches(name, DATASET_MODULES, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            sys.exit(f"run_benchmarks.py: unknown dataset {name!r}{hint}; choose among {', '.join(DATASET_MODULES)}")
        module = str(BENCH_DIR / DATASET_MODULES[name])
        if module not in modules:
            modules.append(module)
    models = [m for m in args.model] + ([args.models] if args.models else [])
    out = [*modules, "-p", "no:cacheprovider"]
    if models:
        out.append("--models=" + ",".join(models))
    for flag, value in (("--limit", args.limit), ("--data-dir", args.data_dir), ("--output-dir", args.output_dir),
                        ("--export-format", args.export_format), ("--num-fewshot", args.num_fewshot),
                        ("--scoring", args.scoring), ("--seed", args.seed), ("--threads", args.threads),
                        ("--gpu-layers", args.gpu_layers), ("--quantization", args.quantization),
                        ("--html", args.html), ("--checkpoint", args.checkpoint)):
        if value is not None:
            out.append(f"{flag}={value}")
    if args.local_only:
        out.append("--local-only")
    if args.use_local:
        out.append("--use-local")
    if args.fresh:
        out.append("--fresh")
    if args.include_cost_analysis:
        out.append("--include-cost-analysis")
    if args.html:
        out.append("--self-contained-html")
    if args.parallel:
        out += ["-n", args.parallel]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pytest

    return int(pytest.main(pytest_args(args)))


if __name__ == "__main__":
    sys.exit(main())
