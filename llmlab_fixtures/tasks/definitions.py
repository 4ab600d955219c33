"""Task definitions loaded from the YAML files next to this module (one file per task).

Field semantics follow lm-evaluation-harness 0.4.x task configs, with one difference made explicit:
``doc_to_text``, ``description`` and ``item_id`` are Jinja2 *templates* rendered to strings, while
``doc_to_choice``, ``doc_to_target`` and ``doc_to_labels`` are Jinja2 *expressions* evaluated to native
Python values (``choices.text`` -> list, ``choices.label.index(answerKey)`` -> int).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
import yaml

from llmlab_fixtures.errors import ConfigError, DataError
from llmlab_fixtures.tasks.preprocess import get_process_docs, registered_names

TASKS_DIR = Path(__file__).resolve().parent
SCORINGS = ("loglik", "generate")
OUTPUT_TYPES = ("multiple_choice", "generate_until")
SAMPLERS = ("default", "first_n")
MC_METRICS = ("acc", "acc_norm", "mc2")
GENERATION_METRICS = ("exact_match",)
METRIC_FUNCTIONS = MC_METRICS + GENERATION_METRICS

# Same settings as lm-eval's template environment (lm_eval/utils.py).
_ENV = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@functools.lru_cache(maxsize=512)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


@functools.lru_cache(maxsize=512)
def _expression(source: str) -> Callable[..., Any]:
    return _ENV.compile_expression(source, undefined_to_none=False)


def render_template(source: str, doc: Mapping[str, Any]) -> str:
    """Render a Jinja2 template against a document; DataError if a field is missing."""
    try:
        return _template(source).render(**doc)
    except jinja2.TemplateError as exc:
        raise DataError(f"cannot render template {source!r}: {exc}") from exc


def evaluate_expression(source: str, doc: Mapping[str, Any]) -> Any:
    """Evaluate a Jinja2 expression against a document to a Python value; DataError on failure."""
    try:
        value = _expression(source)(**doc)
    except (jinja2.TemplateError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataError(f"cannot evaluate {source!r}: {exc}") from exc
    if isinstance(value, jinja2.Undefined):
        raise DataError(f"cannot evaluate {source!r}: a field it uses is missing")
    return value


@dataclass(frozen=True)
class MetricSpec:
    """A reported metric: its name in results and the per-item function that computes it."""

    name: str
    function: str
    filter: str | None = None  # generation tasks: the answer-extraction filter it scores


@dataclass(frozen=True)
class FilterSpec:
    """lm-eval ``regex`` filter followed by ``take_first``."""

    name: str
    regex: str
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass(frozen=True)
class ExactMatchSpec:
    """Options of lm-eval's ``exact_match`` metric."""

    ignore_case: bool = False
    ignore_punctuation: bool = False
    regexes_to_ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationSpec:
    """``generation_kwargs`` of a ``generate_until`` task (greedy only)."""

    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    do_sample: bool = False
    temperature: float = 0.0


@dataclass(frozen=True)
class GenerateScoringSpec:
    """How a multiple-choice task is scored by generation: lettered options, parse the reply's letter."""

    prompt_version: str
    instruction: str
    template: str  # Jinja2; sees the document's fields plus ``options`` ("A. ...\nB. ...")
    max_new_tokens: int = 8
    stop: tuple[str, ...] = ("\n",)
    shuffle_choices: bool = False
    doc_to_choice: str | None = None  # option texts when the task's choices are letters (MMLU)


@dataclass(frozen=True)
class TaskDefinition:
    """One benchmark task, as data."""

    name: str
    prompt_version: str
    dataset_path: str
    dataset_name: str | None
    local_path: str
    eval_split: str
    fewshot_split: str | None
    sampler: str
    num_fewshot: int
    output_type: str
    doc_to_text: str
    doc_to_target: str
    item_id: str
    metrics: tuple[MetricSpec, ...]
    primary_metric: str
    schema: Mapping[str, Any] = field(default_factory=dict)
    local_files: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    doc_to_choice: str | None = None
    doc_to_labels: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    process_docs: str | None = None
    group_field: str | None = None
    group_name: str | None = None
    generation: GenerationSpec | None = None
    filters: tuple[FilterSpec, ...] = ()
    exact_match: ExactMatchSpec = ExactMatchSpec()
    generate: GenerateScoringSpec | None = None
    generate_unsupported: str | None = None
    fewshot_extra_draw: bool | None = None  # None: when few-shot docs come from the evaluation split
    source: Path | None = None

    @property
    def fewshot_draws_extra(self) -> bool:
        """Whether the default sampler draws num_fewshot + 1 docs and drops the evaluated item, like lm-eval."""
        if self.fewshot_extra_draw is not None:
            return self.fewshot_extra_draw
        return self.fewshot_split == self.eval_split

    @property
    def is_multiple_choice(self) -> bool:
        """Whether items are scored over a fixed list of choices."""
        return self.output_type == "multiple_choice"

    def local_file(self, split: str) -> str:
        """Path of a split's JSONL file relative to the data directory."""
        return self.local_files.get(split, f"{self.local_path}/{split}.jsonl")

    def unsupported_reason(self, scoring: str) -> str | None:
        """Why this task cannot run with ``scoring``, or None if it can."""
        if scoring not in SCORINGS:
            return f"unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}"
        if scoring == "generate" and self.is_multiple_choice and self.generate is None:
            return self.generate_unsupported or f"{self.name} has no generation-scoring prompt"
        return None

    def effective_scoring(self, scoring: str) -> str:
        """Generation tasks are always scored by generation, whatever was asked."""
        return scoring if self.is_multiple_choice else "generate"

    def prompt_version_for(self, scoring: str) -> str:
        """The prompt version recorded for a run with ``scoring``."""
        if self.is_multiple_choice and scoring == "generate" and self.generate is not None:
            return f"{self.prompt_version}+{self.generate.prompt_version}"
        return self.prompt_version

    def metrics_for(self, scoring: str) -> tuple[MetricSpec, ...]:
        """Metrics a run with ``scoring`` reports (generation scoring of MC only has ``acc``)."""
        if self.is_multiple_choice and scoring == "generate":
            return (MetricSpec("acc", "acc"),)
        return self.metrics

    def primary_metric_for(self, scoring: str) -> str:
        """The metric whose per-item value sets ``ItemRecord.correct``."""
        names = [m.name for m in self.metrics_for(scoring)]
        return self.primary_metric if self.primary_metric in names else names[0]

    # --- per-document accessors -------------------------------------------------------------

    def text(self, doc: Mapping[str, Any]) -> str:
        """``doc_to_text``: the question part of the prompt."""
        return render_template(self.doc_to_text, doc)

    def describe(self, doc: Mapping[str, Any]) -> str:
        """The rendered description that starts every prompt ('' if none)."""
        return render_template(self.description, doc) if self.description else ""

    def choices(self, doc: Mapping[str, Any]) -> list[str]:
        """``doc_to_choice``: the choice strings of a multiple-choice item."""
        if self.doc_to_choice is None:
            raise DataError(f"task {self.name} has no doc_to_choice")
        value = evaluate_expression(self.doc_to_choice, doc)
        if not isinstance(value, (list, tuple)) or not value:
            raise DataError(f"doc_to_choice {self.doc_to_choice!r} gave {value!r}, not a non-empty list")
        return [str(choice) for choice in value]

    def option_texts(self, doc: Mapping[str, Any]) -> list[str]:
        """The texts shown as lettered options when scoring by generation."""
        expression = self.generate.doc_to_choice if self.generate is not None else None
        if expression is None:
            return self.choices(doc)
        value = evaluate_expression(expression, doc)
        if not isinstance(value, (list, tuple)) or not value:
            raise DataError(f"generate.doc_to_choice {expression!r} gave {value!r}, not a non-empty list")
        return [str(option) for option in value]

    def target(self, doc: Mapping[str, Any]) -> Any:
        """``doc_to_target``: the gold choice index (multiple choice) or the gold answer text."""
        value = evaluate_expression(self.doc_to_target, doc)
        if self.is_multiple_choice:
            try:
                return int(value)
            except (TypeError, ValueError) as exc:
                raise DataError(f"doc_to_target {self.doc_to_target!r} gave {value!r}, not an index") from exc
        return str(value)

    def labels(self, doc: Mapping[str, Any]) -> list[int] | None:
        """``doc_to_labels``: 1 for each true choice (TruthfulQA MC2), None when the task has none."""
        if self.doc_to_labels is None:
            return None
        value = evaluate_expression(self.doc_to_labels, doc)
        if not isinstance(value, (list, tuple)):
            raise DataError(f"doc_to_labels {self.doc_to_labels!r} gave {value!r}, not a list")
        return [int(v) for v in value]

    def target_text(self, doc: Mapping[str, Any]) -> str:
        """The text an exemplar is completed with: the gold choice, or the gold answer."""
        target = self.target(doc)
        return self.choices(doc)[target] if self.is_multiple_choice else target

    def doc_id(self, doc: Mapping[str, Any], position: int = 0, group_position: int | None = None) -> str:
        """Native stable item id; a doc without ``_row``/``_group_row`` uses the positions given."""
        defaults = {"_row": position, "_group_row": position if group_position is None else group_position}
        return render_template(self.item_id, {**defaults, **doc})

    def group(self, doc: Mapping[str, Any]) -> str | None:
        """The item's group (e.g. the MMLU subject), or None."""
        return None if self.group_field is None else str(doc[self.group_field])


def _tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


_REQUIRED = (
    "task",
    "prompt_version",
    "dataset_path",
    "local_path",
    "eval_split",
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "item_id",
    "metrics",
    "primary_metric",
)
_OPTIONAL = {
    "dataset_name",
    "fewshot_split",
    "sampler",
    "num_fewshot",
    "schema",
    "local_files",
    "description",
    "doc_to_choice",
    "doc_to_labels",
    "target_delimiter",
    "fewshot_delimiter",
    "process_docs",
    "group_field",
    "group_name",
    "generation_kwargs",
    "filters",
    "exact_match",
    "generate",
    "generate_unsupported",
    "fewshot_extra_draw",
}


def _metric(raw: Any, where: str) -> MetricSpec:
    if isinstance(raw, str):
        raw = {"name": raw, "function": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{where}: each metric is a name or a mapping with name/function/filter")
    spec = MetricSpec(name=raw["name"], function=raw.get("function", raw["name"]), filter=raw.get("filter"))
    if spec.function not in METRIC_FUNCTIONS:
        raise ConfigError(f"{where}: unknown metric function {spec.function!r}; known: {', '.join(METRIC_FUNCTIONS)}")
    return spec


def _build(raw: dict[str, Any], where: str) -> TaskDefinition:
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - _OPTIONAL)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if raw["output_type"] not in OUTPUT_TYPES:
        raise ConfigError(f"{where}: output_type must be one of {', '.join(OUTPUT_TYPES)}")
    sampler = raw.get("sampler", "default")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}")
    process_docs = raw.get("process_docs")
    if process_docs is not None:
        try:
            get_process_docs(process_docs)
        except KeyError:
            raise ConfigError(
                f"{where}: process_docs {process_docs!r} is not registered; known: {', '.join(registered_names())}"
            ) from None
    gen_kwargs = raw.get("generation_kwargs")
    generation = None
    if gen_kwargs is not None:
        generation = GenerationSpec(
            until=_tuple(gen_kwargs.get("until")),
            max_gen_toks=int(gen_kwargs.get("max_gen_toks", 256)),
            do_sample=bool(gen_kwargs.get("do_sample", False)),
            temperature=float(gen_kwargs.get("temperature", 0.0)),
        )
    gen_scoring = raw.get("generate")
    generate = None
    if gen_scoring is not None:
        generate = GenerateScoringSpec(
            prompt_version=gen_scoring["prompt_version"],
            instruction=gen_scoring.get("instruction", ""),
            template=gen_scoring["template"],
            max_new_tokens=int(gen_scoring.get("max_new_tokens", 8)),
            stop=_tuple(gen_scoring.get("stop", ["\n"])),
            shuffle_choices=bool(gen_scoring.get("shuffle_choices", False)),
            doc_to_choice=gen_scoring.get("doc_to_choice"),
        )
    em = raw.get("exact_match") or {}
    metrics = tuple(_metric(m, where) for m in _tuple(raw["metrics"]))
    filters = tuple(FilterSpec(**f) for f in _tuple(raw.get("filters")))
    filter_names = {f.name for f in filters}
    for metric in metrics:
        if metric.filter is not None and metric.filter not in filter_names:
            raise ConfigError(f"{where}: metric {metric.name} names unknown filter {metric.filter!r}")
    if raw["primary_metric"] not in {m.name for m in metrics}:
        raise ConfigError(f"{where}: primary_metric {raw['primary_metric']!r} is not one of its metrics")
    allowed = MC_METRICS if raw["output_type"] == "multiple_choice" else GENERATION_METRICS
    for metric in metrics:
        if metric.function not in allowed:
            raise ConfigError(f"{where}: metric function {metric.function!r} does not apply to {raw['output_type']}")
        if metric.function == "mc2" and not raw.get("doc_to_labels"):
            raise ConfigError(f"{where}: metric {metric.name} (mc2) needs doc_to_labels")
    if raw["output_type"] == "multiple_choice" and not raw.get("doc_to_choice"):
        raise ConfigError(f"{where}: a multiple_choice task needs doc_to_choice")
    if raw["output_type"] == "generate_until" and generation is None:
        raise ConfigError(f"{where}: a generate_until task needs generation_kwargs")
    return TaskDefinition(
        name=raw["task"],
        prompt_version=str(raw["prompt_version"]),
        dataset_path=raw["dataset_path"],
        dataset_name=raw.get("dataset_name"),
        local_path=raw["local_path"],
        local_files=dict(raw.get("local_files") or {}),
        eval_split=raw["eval_split"],
        fewshot_split=raw.get("fewshot_split"),
        sampler=sampler,
        num_fewshot=int(raw.get("num_fewshot", 0)),
        output_type=raw["output_type"],
        schema=raw.get("schema") or {},
        item_id=raw["item_id"],
        description=raw.get("description") or "",
        doc_to_text=raw["doc_to_text"],
        doc_to_choice=raw.get("doc_to_choice"),
        doc_to_target=str(raw["doc_to_target"]),
        doc_to_labels=raw.get("doc_to_labels"),
        target_delimiter=raw.get("target_delimiter", " "),
        fewshot_delimiter=raw.get("fewshot_delimiter", "\n\n"),
        process_docs=process_docs,
        group_field=raw.get("group_field"),
        group_name=raw.get("group_name"),
        metrics=metrics,
        primary_metric=raw["primary_metric"],
        generation=generation,
        filters=filters,
        exact_match=ExactMatchSpec(
            ignore_case=bool(em.get("ignore_case", False)),
            ignore_punctuation=bool(em.get("ignore_punctuation", False)),
            regexes_to_ignore=_tuple(em.get("regexes_to_ignore")),
        ),
        generate=generate,
        generate_unsupported=raw.get("generate_unsupported"),
        fewshot_extra_draw=raw.get("fewshot_extra_draw"),
    )


def read_task_yaml(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task file's mapping. ``include: other.yaml`` (relative to the file) starts from that file's mapping and
    the including file's own keys replace its top-level keys (lm-evaluation-harness semantics)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read task file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"task file {path} does not hold a mapping")
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include should name one YAML file, got {include!r}")
    base = (path.parent / include).resolve()
    if base in (*including, path.resolve()):
        raise ConfigError(f"{path}: include {include!r} loops back to a file that includes it")
    return {**read_task_yaml(base, (*including, path.resolve())), **raw}


def load_task_file(path: Path) -> TaskDefinition:
    """Load and check one task YAML file; ConfigError names the file on any problem."""
    raw = read_task_yaml(path)
    try:
        task = _build(raw, str(path))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return replace(task, source=path)


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, TaskDefinition]:
    tasks: dict[str, TaskDefinition] = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        task = load_task_file(path)
        if task.name in tasks:
            raise ConfigError(f"task {task.name} is defined twice ({tasks[task.name].source} and {path})")
        tasks[task.name] = task
    return tasks


def list_tasks() -> list[str]:
    """Names of all built-in tasks, sorted."""
    return sorted(_registry())


def get_task(name: str) -> TaskDefinition:
    """The built-in task called ``name``; ConfigError lists the known tasks and close matches."""
    tasks = _registry()
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name, list(tasks), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}.{hint}")
