"""Load a task's documents from the local JSONL mirror (or the Hugging Face Hub), checked and preprocessed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import DataError
from llmlab_fixtures.tasks import TaskDefinition, get_task
from llmlab_fixtures.tasks.preprocess import get_process_docs

DATA_DIR_HINT = "pass --data-dir or set LLMLAB_DATA_DIR to the local mirror (laid out as <dataset>/<split>.jsonl)"

# (task name, resolved file, mtime_ns, size) -> prepared docs; a run reads each file once.
_CACHE: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
_HUB_CACHE: dict[tuple[str, str], list[dict[str, Any]]] = {}

_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


def clear_cache() -> None:
    """Forget every loaded file (tests, or a data directory that changed)."""
    _CACHE.clear()
    _HUB_CACHE.clear()


def _type_ok(value: Any, spec: str) -> bool:
    for option in spec.split("|"):
        option = option.strip()
        if option.startswith("list[") and option.endswith("]"):
            inner = option[5:-1]
            if isinstance(value, list) and all(_type_ok(v, inner) for v in value):
                return True
            continue
        types = _TYPES.get(option)
        if types is None:
            raise DataError(f"unknown type {option!r} in a task schema")
        if isinstance(value, bool) and option != "bool":
            continue  # JSON true/false is not an int here
        if isinstance(value, types):
            return True
    return False


def schema_problem(row: Any, schema: Mapping[str, Any], prefix: str = "") -> str | None:
    """Describe the first way ``row`` breaks ``schema`` (field -> type string or nested mapping), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object{' at ' + prefix.rstrip('.') if prefix else ''}, got {type(row).__name__}"
    for name, spec in schema.items():
        where = f"{prefix}{name}"
        if name not in row:
            return f"missing field {where!r}"
        value = row[name]
        if isinstance(spec, Mapping):
            problem = schema_problem(value, spec, prefix=f"{where}.")
            if problem:
                return problem
        elif not _type_ok(value, str(spec)):
            return f"field {where!r} should be {spec}, got {type(value).__name__} {_short(value)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_doc(task: TaskDefinition, doc: Mapping[str, Any]) -> str | None:
    """What stops ``task`` from scoring this (preprocessed) doc, or None."""
    try:
        task.doc_id(doc)
        if task.is_multiple_choice:
            choices = task.choices(doc)
            gold = task.target(doc)
            if not 0 <= gold < len(choices):
                return f"gold index {gold} is outside the {len(choices)} choices"
            if task.generate is not None and len(task.option_texts(doc)) != len(choices):
                return f"{len(task.option_texts(doc))} option texts for {len(choices)} choices"
            labels = task.labels(doc)
            if labels is not None:
                if len(labels) != len(choices):
                    return f"{len(labels)} labels for {len(choices)} choices"
                if 1 not in labels:
                    return "no choice is labelled true"
        else:
            task.target(doc)
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # a preprocessing function choking on odd values
        return f"{type(exc).__name__}: {exc}"
    return None


def prepare_docs(
    task: TaskDefinition, rows: Iterable[Any], *, source: str = "<rows>", line_numbers: Iterable[int] | None = None
) -> list[dict[str, Any]]:
    """Check rows against the task's schema, run ``process_docs``, and add ``_row`` / ``_group_row``.

    ``_row`` is the 0-based position in the split; ``_group_row`` the position within its group
    (e.g. the MMLU subject). A bad row raises DataError naming ``source`` and its line.
    """
    process = get_process_docs(task.process_docs) if task.process_docs else None
    numbers = iter(line_numbers) if line_numbers is not None else None
    group_counts: dict[str, int] = {}
    docs: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        line = next(numbers) if numbers is not None else index + 1
        problem = schema_problem(row, task.schema)
        doc: dict[str, Any] = {}
        if problem is None:
            try:
                doc = process(dict(row)) if process else dict(row)
            except Exception as exc:
                problem = f"{task.process_docs} preprocessing failed: {type(exc).__name__}: {exc}"
        if problem is None:
            doc["_row"] = index
            if task.group_field is not None:
                group = str(doc[task.group_field])
                doc["_group_row"] = group_counts.get(group, 0)
                group_counts[group] = doc["_group_row"] + 1
            problem = _check_doc(task, doc)
        if problem is not None:
            raise DataError(f"{source}:{line}: malformed {task.name} row: {problem}")
        docs.append(doc)
    return docs


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    lines: list[int] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    with handle:
        try:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
                lines.append(number)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    if not rows:
        raise DataError(f"{path} is empty; re-copy the dataset mirror ({DATA_DIR_HINT})")
    return rows, lines


def _load_local(task: TaskDefinition, data_dir: Path, split: str) -> list[dict[str, Any]]:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; {DATA_DIR_HINT}")
    relative = task.local_file(split)
    path = data_dir / relative
    if not path.is_file():
        raise DataError(f"{task.name} needs {relative} (split {split!r}) but {path} does not exist; {DATA_DIR_HINT}")
    stat = path.stat()
    key = (task.name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        rows, lines = _read_jsonl(path)
        _CACHE[key] = prepare_docs(task, rows, source=str(path), line_numbers=lines)
    return list(_CACHE[key])


def _load_hub(task: TaskDefinition, split: str) -> list[dict[str, Any]]:
    key = (task.name, split)
    if key in _HUB_CACHE:
        return list(_HUB_CACHE[key])
    try:
        import datasets  # optional dependency, only needed for Hub loading
    except ImportError:
        raise DataError(
            f"{task.name}: no data directory given and the `datasets` package is not installed; "
            f"{DATA_DIR_HINT}, or pip install datasets to load {task.dataset_path} from the Hugging Face Hub"
        ) from None
    try:
        dataset = datasets.load_dataset(task.dataset_path, task.dataset_name, split=split)
    except Exception as exc:  # network, auth, missing config: all mean "use the local mirror"
        raise DataError(
            f"{task.name}: cannot load {task.dataset_path} ({task.dataset_name}, split {split}) from the "
            f"Hugging Face Hub ({type(exc).__name__}: {exc}); {DATA_DIR_HINT}"
        ) from exc
    source = f"hf://{task.dataset_path}/{task.dataset_name or 'default'}/{split}"
    docs = prepare_docs(task, (dict(row) for row in dataset), source=source)
    if not docs:
        raise DataError(f"{source} is empty")
    _HUB_CACHE[key] = docs
    return list(docs)


def load_docs(task: TaskDefinition | str, data_dir: Path | None, split: str | None = None) -> list[dict[str, Any]]:
    """The prepared documents of ``task``'s ``split`` (default: its evaluation split), in file order.

    Reads ``<data_dir>/<local path>/<split>.jsonl``; with ``data_dir`` None, loads from the Hub.
    Returns a new list each call (the documents themselves are shared; do not mutate them).
    """
    if isinstance(task, str):
        task = get_task(task)
    split = split or task.eval_split
    if data_dir is None:
        return _load_hub(task, split)
    return _load_local(task, Path(data_dir), split)
