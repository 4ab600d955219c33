"""Write lm-evaluation-harness task YAMLs that read the local dataset mirror instead of the Hugging Face Hub.

Each generated task ``include``s lm-eval's own stock YAML (from the installed ``lm_eval`` package, by absolute
path) and overrides only where the data comes from: ``dataset_path: json`` with ``data_files`` in the mirror, and
``tag`` (so the stock groups are untouched). Prompts, choices, targets, few-shot split and sampler, metrics and
``process_docs``/``process_results`` functions are lm-eval's own. MMLU becomes the group ``llmlab_mmlu`` of 57
subject tasks (the stock ``mmlu_<subject>.yaml`` each), whose rows are selected from the one mirror file by
``llmlab_docs.py``. Example::

    python benchmarks/lm_eval_tasks/generate.py --out /tmp/lm_eval_tasks --data-dir ../shared/datasets \\
        --lm-eval-python /work/lm-eval-venv/bin/python
    lm-eval run --include_path /tmp/lm_eval_tasks --tasks llmlab_arc_challenge ...

Nothing here imports lm_eval: the stock task directory comes from lm-eval's interpreter (``--lm-eval-python``) or
``--stock-dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "llmlab_"
TAG = "llmlab_local"
DOCS_MODULE = Path(__file__).with_name("llmlab_docs.py")
MMLU_STOCK = "mmlu/default"


@dataclass(frozen=True)
class LocalTask:
    """One stock lm-eval task: its YAML (relative to lm_eval/tasks) and the mirror files of its splits."""

    stock_yaml: str
    data_files: dict[str, str]
    overrides: dict[str, Any] = field(default_factory=dict)


# keyed by llmlab task name; ``mmlu`` is handled by write_mmlu
LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", {
        "train": "arc/ARC-Challenge/train.jsonl", "validation": "arc/ARC-Challenge/validation.jsonl",
        "test": "arc/ARC-Challenge/test.jsonl"}),
    "arc_easy": LocalTask("arc/arc_easy.yaml", {
        "train": "arc/ARC-Easy/train.jsonl", "validation": "arc/ARC-Easy/validation.jsonl",
        "test": "arc/ARC-Easy/test.jsonl"}),
    # the mirror has no HellaSwag train split; it only feeds few-shot examples, and the task is 0-shot
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", {"validation": "hellaswag/validation.jsonl"},
                           {"training_split": None}),
    "truthfulqa_mc1": LocalTask("truthfulqa/truthfulqa_mc1.yaml",
                                {"validation": "truthfulqa/multiple_choice.jsonl"}),
    "truthfulqa_mc2": LocalTask("truthfulqa/truthfulqa_mc2.yaml",
                                {"validation": "truthfulqa/multiple_choice.jsonl"}),
    "gsm8k": LocalTask("gsm8k/gsm8k.yaml", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}),
}
TASK_NAMES = (*LOCAL_TASKS, "mmlu")


def lm_eval_name(task: str) -> str:
    """The generated lm-eval task (or group, for mmlu) that reproduces llmlab's ``task``."""
    return PREFIX + task


def stock_tasks_dir(lm_eval_python: Path) -> Path:
    """lm_eval/tasks of the lm-eval installation behind ``lm_eval_python``."""
    code = "import lm_eval.tasks, pathlib; print(pathlib.Path(lm_eval.tasks.__file__).parent)"
    out = subprocess.run([str(lm_eval_python), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"cannot import lm_eval with {lm_eval_python}: {out.stderr.strip().splitlines()[-1:]}; "
                         "install it there (see benchmarks/README.md)")
    return Path(out.stdout.strip())


def _yaml_lines(config: dict[str, Any]) -> str:
    """YAML text for ``config``; values are JSON (valid YAML flow style), ``!function`` values kept raw."""
    lines = []
    for key, value in config.items():
        if isinstance(value, str) and value.startswith("!function "):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _data_files(data_dir: Path, files: dict[str, str]) -> dict[str, str]:
    paths = {split: data_dir / name for split, name in files.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"dataset file(s) missing: {', '.join(missing)}; pass --data-dir with the dataset mirror")
    return {split: str(path.resolve()) for split, path in paths.items()}


def _local_config(stock: Path, name: str, data_files: dict[str, str], **overrides: Any) -> dict[str, Any]:
    return {"include": str(stock), "task": name, "tag": TAG, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files}, **overrides}


def mmlu_selection(data_dir: Path, limit: int | None) -> dict[str, int | None]:
    """Subject -> test rows to keep: llmlab's ``--limit N`` takes the first N rows of the whole file (subjects in
    file order), so only the subjects those rows touch are kept, the last one cut. ``None``: every row."""
    with (data_dir / "mmlu/test.jsonl").open(encoding="utf-8") as rows:  # not splitlines(): text holds U+2028
        subjects = [json.loads(line)["subject"] for line in rows if line.strip()]
    if limit is None:
        return dict.fromkeys(subjects)
    return dict(Counter(subjects[:limit]))


def write_mmlu(out_dir: Path, stock_dir: Path, data_dir: Path, limit: int | None) -> None:
    """The ``llmlab_mmlu`` group (size-weighted acc, as lm-eval's ``mmlu``) of stock subject tasks on local rows."""
    data_files = _data_files(data_dir, {"test": "mmlu/test.jsonl", "dev": "mmlu/dev.jsonl"})
    selection = mmlu_selection(data_dir, limit)
    subjects = []
    for subject in selection:
        stock = stock_dir / MMLU_STOCK / f"mmlu_{subject}.yaml"
        if not stock.is_file():
            raise SystemExit(f"no stock lm-eval task for MMLU subject {subject!r} ({stock})")
        name = lm_eval_name(f"mmlu_{subject}")
        config = _local_config(stock, name, data_files, task_alias=subject,
                               process_docs=f"!function llmlab_docs.mmlu_{subject}")
        (out_dir / f"{name}.yaml").write_text(_yaml_lines(config))
        subjects.append(name)
    group = {"group": lm_eval_name("mmlu"), "task": subjects,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    (out_dir / f"{lm_eval_name('mmlu')}.yaml").write_text(_yaml_lines(group))
    (out_dir / "mmlu_selection.json").write_text(json.dumps(selection, indent=1) + "\n")
    shutil.copyfile(DOCS_MODULE, out_dir / DOCS_MODULE.name)


def write_tasks(out_dir: Path, data_dir: Path, stock_dir: Path, tasks: tuple[str, ...] = TASK_NAMES,
                mmlu_limit: int | None = None) -> dict[str, str]:
    """Write the YAMLs for ``tasks`` into ``out_dir``; returns llmlab task -> lm-eval task/group name.

    ``mmlu_limit`` keeps the MMLU rows llmlab's ``--limit`` would score (run that group without ``--limit``).
    """
    unknown = sorted(set(tasks) - set(TASK_NAMES))
    if unknown:
        raise SystemExit(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASK_NAMES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task == "mmlu":
            write_mmlu(out_dir, stock_dir, data_dir, mmlu_limit)
            continue
        spec = LOCAL_TASKS[task]
        stock = stock_dir / spec.stock_yaml
        if not stock.is_file():
            raise SystemExit(f"this lm-eval has no {spec.stock_yaml} ({stock})")
        config = _local_config(stock, lm_eval_name(task), _data_files(data_dir, spec.data_files), **spec.overrides)
        (out_dir / f"{lm_eval_name(task)}.yaml").write_text(_yaml_lines(config))
    return {task: lm_eval_name(task) for task in tasks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the YAMLs (lm-eval --include_path)")
    parser.add_argument("--data-dir", type=Path, required=True, help="the dataset mirror (../shared/datasets)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--lm-eval-python", type=Path, help="python of the lm-eval virtual environment")
    where.add_argument("--stock-dir", type=Path, help="lm_eval/tasks directory of the installed lm-eval")
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated llmlab task names")
    parser.add_argument("--mmlu-limit", type=int, default=None, help="keep the MMLU rows of llmlab's --limit N")
    args = parser.parse_args(argv)
    stock = args.stock_dir or stock_tasks_dir(args.lm_eval_python)
    names = write_tasks(args.out, args.data_dir, stock, tuple(t for t in args.tasks.split(",") if t), args.mmlu_limit)
    for task, name in names.items():
        print(f"{task}: {name}")


if __name__ == "__main__":
    sys.exit(main())
