"""Wall time of lm-evaluation-harness (its transformers backend) beside llmlab on the same GGUF, items, tasks and shots.

lm-eval runs from its own virtual environment (``--lm-eval-python``; see benchmarks/README.md) on task YAMLs that
include its stock task definitions but read the local dataset mirror (benchmarks/lm_eval_tasks/generate.py, written
to a temporary directory). For each task it is timed once per batch size (``lm-eval run --model hf --model_args
pretrained=<dir>,gguf_file=<file>,dtype=float32 --device cpu ...``), and llmlab once per backend (``pytest bench -k
<task> --models=<spec> ...``), each as a fresh process with the same CPU threads. Printed per task: accuracy and
wall time of every run, and the ratio of lm-eval's fastest to llmlab's fastest. Example::

    python benchmarks/lm_eval_compare.py --lm-eval-python /work/lm-eval-venv/bin/python --limit 5 --batch-sizes 1

``--limit N`` scores the first N items of each task on both sides (for MMLU the first N rows of the test file, which
is what llmlab's ``--limit`` takes; lm-eval gets the matching subject tasks). Without it every item is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import default_data_dir  # noqa: E402
from lm_eval_tasks.generate import TASK_NAMES, stock_tasks_dir, write_tasks  # noqa: E402

from llmlab_fixtures.reports.table import text_grid  # noqa: E402

DUMP_REQUESTS = ROOT / "benchmarks" / "lm_eval_tasks" / "dump_requests.py"
DEFAULT_TASKS = "arc_challenge,hellaswag,truthfulqa_mc2,mmlu"
DEFAULT_SHOTS = {"mmlu": 5}  # the MMLU target is 5-shot; the others use their task's default
DEFAULT_BACKENDS = "llama-cpp:smollm2-135m,transformers:smollm2-135m"
# llmlab metric -> lm-eval "<metric>,<filter>" key
METRICS = {"acc": "acc,none", "acc_norm": "acc_norm,none",
           "exact_match_strict": "exact_match,strict-match", "exact_match_flexible": "exact_match,flexible-extract"}
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}:\d{2}:\d{2}:\d{2}) ")  # lm-eval's log line prefix
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Run:
    """One timed process: which side and setting, its wall clock, and the scores it reported."""

    side: str  # "lm-eval" or "llmlab"
    setting: str  # "batch 8" or a model spec
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    n_items: int | None = None
    eval_s: float | None = None  # building prompts, scoring and metrics, without start-up and model load
    load_s: float | None = None  # model load (lm-eval: measured once, alone)
    returncode: int = 0
    output: str = ""  # lm-eval --output_path or llmlab --output-dir
    agreement: dict[str, Any] | None = None  # llmlab runs, with --log-samples: per-item match against lm-eval
    conversion: str | None = None  # llmlab transformers on a GGUF: "converted now" or "loaded saved"
    evaluated_per_item: float | None = None  # llmlab: prompt tokens run through the model per item (after reuse)
    completion_tokens: int | None = None  # llmlab: generated tokens of the whole run

    @property
    def items_per_s(self) -> float | None:
        """Items over the evaluation time (lm-eval: over its log's build-to-save span)."""
        return self.n_items / self.eval_s if self.n_items and self.eval_s else None

    @property
    def generated_per_s(self) -> float | None:
        return self.completion_tokens / self.eval_s if self.completion_tokens and self.eval_s else None


def default_gguf() -> Path:
    from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf

    return embedded_gguf(SMOLLM2)


def thread_env(threads: int) -> dict[str, str]:
    """The environment of every timed process: offline, ``threads`` CPU threads for torch/OpenMP/MKL."""
    return {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def timed(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> tuple[float, int]:
    """Run ``cmd`` with its output in ``log``; (wall seconds, exit status)."""
    with log.open("w") as out:
        start = time.perf_counter()
        code = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        return time.perf_counter() - start, code


def fresh_dir(path: Path) -> Path:
    """``path``, emptied if an earlier run in the same --work-dir left outputs there (never read stale scores)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def model_args(gguf: Path, dtype: str) -> str:
    return f"pretrained={gguf.parent},gguf_file={gguf.name},dtype={dtype}"


def lm_eval_metrics(output_dir: Path, name: str) -> tuple[dict[str, float], int | None]:
    """Scores of task/group ``name`` from lm-eval's results_*.json under ``output_dir``, and its item count."""
    found = sorted(output_dir.rglob("results_*.json"))
    if not found:
        return {}, None
    data = json.loads(found[-1].read_text())
    scores = data.get("results", {}).get(name, {})
    metrics = {ours: float(scores[key]) for ours, key in METRICS.items() if isinstance(scores.get(key), (int, float))}
    samples = data.get("n-samples", {})
    subtasks = data.get("group_subtasks", {}).get(name) or [name]
    counts = [samples[t]["effective"] for t in subtasks if t in samples]
    return metrics, (sum(counts) if counts else None)


def run_lm_eval(args: argparse.Namespace, task_dir: Path, task: str, name: str, batch_size: str,
                work: Path) -> Run:
    """One ``lm-eval run`` of ``name`` (the generated twin of llmlab's ``task``) at ``batch_size``."""
    out = fresh_dir(work / f"lm_eval_{task}_bs{batch_size}")
    cmd = [str(args.lm_eval_python), "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", model_args(args.gguf, args.dtype), "--device", "cpu", "--tasks", name,
           "--include_path", str(task_dir), "--batch_size", batch_size, "--output_path", str(out)]
    shots = args.shots.get(task)
    if shots is not None:
        cmd += ["--num_fewshot", str(shots)]
    if args.limit is not None and task != "mmlu":  # MMLU's rows are chosen by the generated tasks
        cmd += ["--limit", str(args.limit)]
    if args.max_batch_size is not None:
        cmd += ["--max_batch_size", str(args.max_batch_size)]
    if args.log_samples:
        cmd.append("--log_samples")
    log = out.with_suffix(".log")
    wall, code = timed(cmd, thread_env(args.threads), log)
    metrics, n_items = lm_eval_metrics(out, name)
    return Run("lm-eval", f"batch {batch_size}", wall, metrics, n_items, eval_s=lm_eval_eval_seconds(log),
               returncode=code, output=str(out))


def lm_eval_eval_seconds(log: Path) -> float | None:
    """Seconds from lm-eval's first "Building contexts" log line to "Saving results aggregated" (1 s resolution):
    prompt building, scoring and metrics, as llmlab's own ``wall_s`` covers."""
    start = end = None
    for line in log.read_text(errors="replace").splitlines():
        stamp = LOG_TIME.match(line)
        if not stamp:
            continue
        if start is None and "Building contexts for" in line:
            start = datetime.strptime(stamp.group(1), "%Y-%m-%d:%H:%M:%S")
        elif start is not None and "Saving results aggregated" in line:
            end = datetime.strptime(stamp.group(1), "%Y-%m-%d:%H:%M:%S")
    return (end - start).total_seconds() if start and end else None


def lm_eval_load_seconds(args: argparse.Namespace, work: Path) -> dict[str, float] | None:
    """Seconds lm-eval takes to import its HF model class, and to build the model from the GGUF (alone, once)."""
    code = (
        "import time, json; t0 = time.perf_counter()\n"
        "from lm_eval.models.huggingface import HFLM; t1 = time.perf_counter()\n"
        f"HFLM(**dict(kv.split('=', 1) for kv in {model_args(args.gguf, args.dtype)!r}.split(',')), device='cpu')\n"
        "print(json.dumps({'import_s': t1 - t0, 'load_s': time.perf_counter() - t1}))\n"
    )
    log = work / "lm_eval_load.log"
    done = subprocess.run([str(args.lm_eval_python), "-c", code], env=thread_env(args.threads), capture_output=True,
                          text=True, check=False)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"measuring lm-eval's model load failed; see {log}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status(run: Run) -> str:
    """ok / exit N, and for a GGUF on llmlab's transformers whether its saved conversion was loaded."""
    status = "ok" if run.returncode == 0 else f"exit {run.returncode}"
    return f"{status} ({run.conversion})" if run.conversion else status


def run_llmlab(args: argparse.Namespace, task: str, spec: str, work: Path) -> Run:
    """One ``pytest bench`` process scoring llmlab's ``task`` on model ``spec``."""
    slug = spec.replace(":", "_").replace("/", "_")
    out = fresh_dir(work / f"llmlab_{task}_{slug}")
    cmd = [sys.executable, "-m", "pytest", "bench", "-k", task, f"--models={spec}", "--data-dir", str(args.data_dir),
           "-p", "no:cacheprovider", "--no-checkpoint", "--output-dir", str(out), "--threads", str(args.threads),
           "--export-format", "json", "-q"]
    shots = args.shots.get(task)
    if shots is not None:
        cmd += ["--num-fewshot", str(shots)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if spec.startswith("transformers:"):
        cmd += ["--device", "cpu", "--batch-size", args.llmlab_batch_size]
    wall, code = timed(cmd, thread_env(args.threads), out.with_suffix(".log"), cwd=ROOT)
    run = Run("llmlab", spec, wall, returncode=code, output=str(out))
    results = out / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        for row in data.get("summary", []):
            if row.get("dataset") == task and row.get("model") == spec:
                run.metrics = {k: float(v["value"]) for k, v in row.get("metrics", {}).items() if k in METRICS}
                run.n_items, run.eval_s = row.get("n_items"), row.get("wall_s")
                if run.n_items:
                    run.evaluated_per_item = (row.get("evaluated_tokens") or 0) / run.n_items
                run.completion_tokens = row.get("completion_tokens")
                run.load_s = (row.get("load") or {}).get("load_s")
                run.conversion = ((row.get("model_info") or {}).get("extra") or {}).get("gguf_conversion")
    return run


def _item_key(task: str, doc: dict[str, Any], doc_id: int) -> str:
    """llmlab's item_id for lm-eval's doc ``doc_id`` (ARC id, HellaSwag ind, MMLU subject/row, else the row index)."""
    if task.startswith("arc_"):
        return str(doc["id"])
    if task == "hellaswag":
        return str(doc["ind"])
    if task == "mmlu":
        return f"{doc['subject']}/{doc_id}"
    return str(doc_id)


def lm_eval_loglikelihoods(output_dir: Path, task: str) -> dict[str, list[float]]:
    """Per-item choice log-likelihoods from lm-eval's samples_*.jsonl (written with --log_samples)."""
    found: dict[str, list[float]] = {}
    for path in sorted(output_dir.rglob("samples_*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                sample = json.loads(line)
                resps = sample.get("filtered_resps") or []
                if resps and isinstance(resps[0], list):  # multiple choice: [loglikelihood, is_greedy] per choice
                    found[_item_key(task, sample["doc"], sample["doc_id"])] = [float(r[0]) for r in resps]
    return found


def llmlab_loglikelihoods(output_dir: Path) -> dict[str, list[float]]:
    found = {}
    items = output_dir / "items.jsonl"
    if items.is_file():
        with items.open(encoding="utf-8") as lines:
            for line in lines:
                item = json.loads(line)
                if item.get("loglikelihoods"):
                    found[str(item["item_id"])] = [float(x) for x in item["loglikelihoods"]]
    return found


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def item_agreement(theirs: dict[str, list[float]], ours: dict[str, list[float]]) -> dict[str, Any] | None:
    """On the items both scored: how often the highest log-likelihood choice agrees, and the largest difference."""
    shared = [k for k in theirs if k in ours and len(theirs[k]) == len(ours[k])]
    if not shared:
        return None
    same = sum(_argmax(theirs[k]) == _argmax(ours[k]) for k in shared)
    worst = max(abs(a - b) for k in shared for a, b in zip(theirs[k], ours[k]))
    return {"items": len(shared), "same_argmax": same, "max_abs_loglik_diff": worst}


def lm_eval_requests(args: argparse.Namespace, task_dir: Path, task: str, name: str) -> dict[str, list[list[Any]]]:
    """item id -> [[context, continuation], ...] as lm-eval builds them (dump_requests.py in its venv)."""
    cmd = [str(args.lm_eval_python), str(DUMP_REQUESTS), "--include-path", str(task_dir), "--task", name]
    if args.shots.get(task) is not None:
        cmd += ["--num-fewshot", str(args.shots[task])]
    if args.limit is not None and task != "mmlu":
        cmd += ["--limit", str(args.limit)]
    done = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lm-eval could not build the {name} requests: {done.stderr.strip()[-2000:]}")
    items = [json.loads(line) for line in done.stdout.split("\n") if line.startswith("{")]  # text holds U+2028
    return {_item_key(task, item, item["doc_id"]): item["requests"] for item in items}


def llmlab_requests(args: argparse.Namespace, task_name: str) -> dict[str, list[list[Any]]]:
    """item id -> [[context, continuation], ...] as llmlab's evaluator builds them (generation: [[prompt, None]])."""
    from llmlab_fixtures.eval.datasets import load_docs
    from llmlab_fixtures.eval.prompts import ExemplarSampler, generation_request, loglikelihood_requests
    from llmlab_fixtures.tasks import get_task

    task = get_task(task_name)
    docs = load_docs(task, args.data_dir)[: args.limit]
    shots = task_shots(args, task_name)
    fewshot = load_docs(task, args.data_dir, split=task.fewshot_split) if shots and task.fewshot_split else None
    sampler = ExemplarSampler(task, fewshot, shots)
    found: dict[str, list[list[Any]]] = {}
    group_rows: dict[str | None, int] = {}
    for position, doc in enumerate(docs):
        group = task.group(doc) if task.group_field else None
        group_rows[group] = group_rows.get(group, -1) + 1
        exemplars = sampler.exemplars(doc)  # drawn for every item, in order, like the evaluator
        key = task.doc_id(doc, position, group_rows[group])
        if task.generation is not None:
            found[key] = [[generation_request(task, doc, exemplars).prompt, None]]
        else:
            found[key] = [[r.context, r.continuation] for r in loglikelihood_requests(task, doc, exemplars)]
    return found


def task_shots(args: argparse.Namespace, task: str) -> int:
    """Few-shot examples both sides use for ``task``: the override, else llmlab's (= lm-eval's) task default."""
    from llmlab_fixtures.tasks import get_task

    return args.shots.get(task, get_task(task).num_fewshot)


def _first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {at}: lm-eval {a[max(at - 30, 0): at + 30]!r} vs llmlab {b[max(at - 30, 0): at + 30]!r}"


def prompt_check(theirs: dict[str, list[list[Any]]], ours: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """Compare every request string of the items both sides build; up to 5 differences described."""
    differences = []
    for key in [k for k in theirs if k not in ours][:5]:
        differences.append(f"{key}: only lm-eval has this item")
    for key in [k for k in ours if k not in theirs][:5]:
        differences.append(f"{key}: only llmlab has this item")
    same = 0
    for key in (k for k in theirs if k in ours):
        a, b = theirs[key], ours[key]
        if a == b:
            same += 1
        elif len(differences) < 5:
            if len(a) != len(b):
                differences.append(f"{key}: {len(a)} requests in lm-eval, {len(b)} in llmlab")
            else:
                for index, (x, y) in enumerate(zip(a, b)):
                    for part, xs, ys in (("context", x[0], y[0]), ("continuation", x[1], y[1])):
                        if xs != ys and len(differences) < 5:
                            differences.append(f"{key} request {index} {part} "
                                               + _first_difference(str(xs), str(ys)))
    return {"lm_eval_items": len(theirs), "llmlab_items": len(ours), "identical_items": same,
            "differences": differences}


def fastest(runs: list[Run], side: str, measure: str) -> Run | None:
    """The successful run of ``side`` with the least ``measure`` ("wall_s" or "eval_s")."""
    ok = [r for r in runs if r.side == side and r.returncode == 0 and r.metrics and getattr(r, measure) is not None]
    return min(ok, key=lambda r: getattr(r, measure)) if ok else None


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def task_report(task: str, runs: list[Run], shots: int) -> list[str]:
    """The lines printed for one task: every run, then the fastest-to-fastest ratio."""
    metric_names = [m for m in METRICS if any(m in r.metrics for r in runs)]
    header = ["side", "setting", "items", *metric_names, "wall_s", "eval_s", "load_s", "items/s",
              "prompt tok/item", "gen tok/s", "status"]
    rows = [[r.side, r.setting, _num(r.n_items, 0), *(_num(r.metrics.get(m), 4) for m in metric_names),
             _num(r.wall_s), _num(r.eval_s), _num(r.load_s), _num(r.items_per_s, 3), _num(r.evaluated_per_item, 0),
             _num(r.generated_per_s), _status(r)] for r in runs]
    lines = [f"{task} ({shots}-shot)", *text_grid(header, rows, markdown=False)]
    theirs, ours = fastest(runs, "lm-eval", "wall_s"), fastest(runs, "llmlab", "wall_s")
    if theirs and ours:
        lines.append(f"wall ratio, lm-eval fastest ({theirs.setting}) / llmlab fastest ({ours.setting}): "
                     f"{theirs.wall_s / ours.wall_s:.2f}x")
        theirs, ours = fastest(runs, "lm-eval", "eval_s"), fastest(runs, "llmlab", "eval_s")
        if theirs and ours and theirs.eval_s and ours.eval_s:
            lines.append(f"eval_s ratio (no start-up, no model load), lm-eval fastest ({theirs.setting}) / llmlab "
                         f"fastest ({ours.setting}): {theirs.eval_s / ours.eval_s:.2f}x")
    else:
        lines.append("ratio: not available (a side produced no scores; see the .log files beside the outputs)")
    for run in runs:
        if run.agreement:
            a = run.agreement
            lines.append(f"per item vs lm-eval, {run.setting}: same choice on {a['same_argmax']}/{a['items']} items, "
                         f"largest log-likelihood difference {a['max_abs_loglik_diff']:.2g}")
    return lines


def parse_shots(text: str) -> dict[str, int]:
    shots = dict(DEFAULT_SHOTS)
    for part in filter(None, text.split(",")):
        task, _, number = part.partition("=")
        if task not in TASK_NAMES or not number.isdigit():
            raise SystemExit(f"--shots takes TASK=N pairs with TASK in {', '.join(TASK_NAMES)}, got {part!r}")
        shots[task] = int(number)
    return shots


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-python", type=Path, required=True, help="python of lm-eval's virtual environment")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated, from {', '.join(TASK_NAMES)}")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--batch-sizes", default="1,8,auto", help="lm-eval batch sizes to time")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="lm-eval --max_batch_size, the cap of batch size auto (lm-eval's default: 64)")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS, help="llmlab model specs to time")
    parser.add_argument("--llmlab-batch-size", default="auto", help="llmlab --batch-size for transformers specs")
    parser.add_argument("--shots", default="", help="TASK=N overrides (default mmlu=5, other tasks their own)")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for lm-eval (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="lm-eval dtype (llmlab uses float32 on CPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="the dataset mirror")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep logs and outputs here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    parser.add_argument("--log-samples", action="store_true", help="lm-eval --log_samples (per-item outputs)")
    parser.add_argument("--check-prompts", action="store_true",
                        help="first compare every prompt lm-eval and llmlab build (no model needed)")
    parser.add_argument("--prompts-only", action="store_true", help="only --check-prompts; time nothing")
    parser.add_argument("--skip-load-check", action="store_true", help="do not time lm-eval's model load alone")
    args = parser.parse_args(argv)
    args.shots = parse_shots(args.shots)
    args.task_list = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.task_list if t not in TASK_NAMES]
    if unknown or not args.task_list:
        raise SystemExit(f"--tasks takes names from {', '.join(TASK_NAMES)}, got {args.tasks!r}")
    args.gguf = (args.gguf or default_gguf()).resolve()
    if not args.lm_eval_python.is_file():
        raise SystemExit(f"{args.lm_eval_python} does not exist; create lm-eval's venv (see benchmarks/README.md)")
    if not args.gguf.is_file():
        raise SystemExit(f"GGUF {args.gguf} does not exist; pass --gguf")
    return args


def check_prompts(args: argparse.Namespace, task_dir: Path, names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Compare, task by task, every request both sides build; print the outcome and up to 5 differences."""
    checks = {}
    for task in args.task_list:
        check = prompt_check(lm_eval_requests(args, task_dir, task, names[task]), llmlab_requests(args, task))
        checks[task] = check
        print(f"prompts {task}: {check['identical_items']} of {check['lm_eval_items']} lm-eval items "
              f"({check['llmlab_items']} llmlab) identical", flush=True)
        for line in check["differences"]:
            print(f"  {line}", flush=True)
    return checks


def time_task(args: argparse.Namespace, task_dir: Path, task: str, name: str, work: Path,
              load: dict[str, float] | None) -> list[Run]:
    """Every lm-eval batch size, then every llmlab backend, on ``task``; per-item agreement with --log-samples."""
    runs = []
    for size in filter(None, args.batch_sizes.split(",")):
        run = run_lm_eval(args, task_dir, task, name, size, work)
        if load and run.returncode == 0:
            run.load_s = load["load_s"]
        runs.append(run)
        print(f"  {task}: lm-eval {run.setting}: {run.wall_s:.1f}s {run.metrics}", flush=True)
    for spec in filter(None, args.backends.split(",")):
        run = run_llmlab(args, task, spec, work)
        runs.append(run)
        print(f"  {task}: llmlab {spec}: {run.wall_s:.1f}s {run.metrics}", flush=True)
    reference = next((r for r in runs if r.side == "lm-eval" and r.returncode == 0), None)
    if args.log_samples and reference:
        theirs = lm_eval_loglikelihoods(Path(reference.output), task)
        for run in runs:
            if run.side == "llmlab":
                run.agreement = item_agreement(theirs, llmlab_loglikelihoods(Path(run.output)))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lm_eval_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    task_dir = work / "tasks"
    names = write_tasks(task_dir, args.data_dir, stock_tasks_dir(args.lm_eval_python), tuple(args.task_list),
                        mmlu_limit=args.limit)
    print(f"logs and outputs in {work}", flush=True)
    report: dict[str, Any] = {"limit": args.limit, "threads": args.threads, "gguf": str(args.gguf),
                              "shots": args.shots, "prompts": {}, "lm_eval_load": None, "tasks": {}}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    if args.check_prompts or args.prompts_only:
        report["prompts"] = check_prompts(args, task_dir, names)
        save()
        if args.prompts_only:
            return 0 if all(c["identical_items"] == c["lm_eval_items"] == c["llmlab_items"]
                            for c in report["prompts"].values()) else 1
    load = None if args.skip_load_check else lm_eval_load_seconds(args, work)
    if load:
        print(f"lm-eval start-up: import {load['import_s']:.1f}s, model load {load['load_s']:.1f}s", flush=True)
    report["lm_eval_load"] = load
    for task in args.task_list:
        runs = time_task(args, task_dir, task, names[task], work, load)
        print("\n".join(task_report(task, runs, task_shots(args, task))) + "\n", flush=True)
        report["tasks"][task] = [asdict(r) for r in runs]
        save()
    failed = [r for rs in report["tasks"].values() for r in rs if r["returncode"] != 0 or not r["metrics"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
