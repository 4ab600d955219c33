"""Per-item scoring and aggregation, following lm-evaluation-harness 0.4.x definitions."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from llmlab_fixtures.eval.records import ItemRecord, MetricValue
from llmlab_fixtures.tasks.definitions import ExactMatchSpec, FilterSpec, TaskDefinition

LETTERS = string.ascii_uppercase

# --- statistics ------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (nan for no values)."""
    return math.fsum(values) / len(values) if values else math.nan


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation (ddof=1) / sqrt(n); None for n < 2."""
    return _running(values).stderr


Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion ``successes / n``; None for n == 0.

    Unlike the normal approximation (p ± z·se) it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends: rounding would leave 1e-17
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def binary_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The Wilson 95% interval of a metric whose per-item values are all 0 or 1 (accuracy), else None."""
    return _running(values).interval


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float | None:
    """lm-eval's ``pooled_sample_stderr`` for a size-weighted group mean; None when undefined."""
    dof = sum(sizes) - len(sizes)
    if dof <= 0:
        return None
    pooled_var = math.fsum((size - 1) * se**2 * size for se, size in zip(stderrs, sizes, strict=True)) / dof
    return math.sqrt(pooled_var / sum(sizes))


# --- multiple choice by log-likelihood -------------------------------------------------------


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (like numpy); NaN counts as -inf."""
    best, best_value = 0, -math.inf
    for index, value in enumerate(values):
        value = -math.inf if math.isnan(value) else value
        if value > best_value or index == 0:
            best, best_value = index, value
    return best


def normalized_scores(loglikelihoods: Sequence[float], choices: Sequence[str]) -> list[float]:
    """Log-likelihood per character of the choice text (delimiter excluded), as lm-eval's acc_norm."""
    scores = []
    for ll, choice in zip(loglikelihoods, choices, strict=True):
        if choice:
            scores.append(ll / len(choice))
        else:  # lm-eval divides by zero here; a negative log-likelihood becomes -inf
            scores.append(-math.inf if ll < 0 else math.nan)
    return scores


def acc(loglikelihoods: Sequence[float], gold: int) -> float:
    """1.0 if the most likely choice is the gold one."""
    return 1.0 if argmax(loglikelihoods) == gold else 0.0


def acc_norm(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """1.0 if the choice with the highest log-likelihood per character is the gold one."""
    return 1.0 if argmax(normalized_scores(loglikelihoods, choices)) == gold else 0.0


def mc2(loglikelihoods: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass on the true answers, p = exp(ll) normalised over all choices."""
    if len(loglikelihoods) != len(labels):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(labels)} labels")
    top = max(loglikelihoods)  # shifting by the max changes nothing but avoids underflow to 0/0
    probs = [math.exp(ll - top) for ll in loglikelihoods]
    return math.fsum(p for p, label in zip(probs, labels, strict=True) if label == 1) / math.fsum(probs)


# --- generation: answer extraction and exact match ---------------------------------------------


def regex_filter(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter: ``findall``, pick match ``group_select``, first non-empty group, strip."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        non_empty = [group for group in match if group]
        match = non_empty[0] if non_empty else ""
    return match.strip()


def apply_filter(text: str, spec: FilterSpec) -> str:
    """Run one task filter on a model response."""
    return regex_filter(text, spec.regex, spec.group_select, spec.fallback)


def normalize_answer(text: str, spec: ExactMatchSpec) -> str:
    """Apply exact_match's ``regexes_to_ignore``, ``ignore_case`` and ``ignore_punctuation`` in lm-eval's order."""
    for pattern in spec.regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, spec: ExactMatchSpec) -> float:
    """1.0 if prediction and reference agree after the same normalisation."""
    return 1.0 if normalize_answer(prediction, spec) == normalize_answer(reference, spec) else 0.0


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text up to the first occurrence of any stop string (lm-eval cuts at each ``until`` in turn)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


# --- multiple choice by generation: the reply's letter -------------------------------------------

_NOT_ARTICLE = {"is", "was", "seems", "appears", "would", "could", "should", "because", "since", "and", "or"}


def parse_choice_letter(text: str, n_choices: int) -> int | None:
    """Index of the option letter a reply names ("B", "B.", "(B)", "The answer is B", "Answer: C"...), or None.

    First an explicit "answer is X" / "answer: X"; otherwise the first standalone option letter,
    skipping "A"/"I" used as an English word ("A cat...", "I think...").
    """
    if n_choices < 1:
        return None
    letters = LETTERS[: min(n_choices, len(LETTERS))]
    cls = f"[{letters}]"
    explicit = re.search(rf"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*[\(\[*]*({cls})(?![A-Za-z0-9])", text)
    if explicit:
        return letters.index(explicit.group(1))
    for match in re.finditer(rf"(?<![A-Za-z0-9])({cls})(?![A-Za-z0-9])", text):
        letter = match.group(1)
        if letter in "AI":
            following = re.match(r"\s+([a-z]+)", text[match.end() :])
            if following and (letter == "I" or following.group(1) not in _NOT_ARTICLE):
                continue
        return letters.index(letter)
    return None


# --- aggregation -----------------------------------------------------------------------------


def error_count(items: Sequence[ItemRecord]) -> int:
    """Items that failed and are left out of every metric."""
    return sum(1 for item in items if item.error is not None)


@dataclass
class _Running:
    """Count, mean and squared deviations of a stream of per-item values (Welford's update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    ones: int = 0  # values equal to 1.0
    binary: bool = True  # every value so far is 0.0 or 1.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)
        self.ones += value == 1.0
        self.binary = self.binary and value in (0.0, 1.0)

    @property
    def stderr(self) -> float | None:
        """lm-eval's ``mean_stderr``: sample standard deviation (ddof=1) / sqrt(n); None for n < 2."""
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1)) / math.sqrt(self.n) if self.n >= 2 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The Wilson 95% interval when every value is 0 or 1 (accuracy), else None."""
        return wilson_interval(self.ones, self.n) if self.binary and self.n else None


def _running(values: Sequence[float]) -> _Running:
    counted = _Running()
    for value in values:
        counted.add(value)
    return counted


class MetricTally:
    """Aggregates item metrics as the items arrive: memory grows with metrics and groups, never with items.

    ``results()`` gives each metric's item-weighted mean and stderr; grouped tasks (MMLU) get lm-eval's pooled
    group stderr, plus ``<metric>_<group_name>_mean``: the unweighted mean over groups, stderr sqrt(sum se_g^2) / k.
    """

    def __init__(self, task: TaskDefinition, scoring: str | None = None) -> None:
        self.task = task
        self._declared = [m.name for m in task.metrics_for(scoring)] if scoring is not None else None
        self._present: list[str] = []  # metric names in first-seen order (when scoring is None)
        self._overall: dict[str, _Running] = {}
        self._groups: dict[str, dict[str, _Running]] = {}  # groups in first-seen order

    def add(self, item: ItemRecord) -> None:
        """Count one finished item's metrics (an item with an ``error`` has none: ItemTotals counts it)."""
        if item.error is not None:
            return
        for name, value in item.metrics.items():
            if name not in self._present:
                self._present.append(name)
            self._overall.setdefault(name, _Running()).add(value)
            if self.task.group_field and item.group is not None:
                self._groups.setdefault(item.group, {}).setdefault(name, _Running()).add(value)

    def _names(self) -> list[str]:
        if self._declared is not None:
            return self._declared
        declared = [m.name for m in self.task.metrics if m.name in self._present]
        return declared + [name for name in self._present if name not in declared]

    def group_results(self) -> dict[str, list[MetricValue]]:
        """Per-group metrics (e.g. per MMLU subject), groups in first-seen order; {} for ungrouped tasks."""
        names = self._names()
        return {group: [MetricValue(name, r.mean, r.stderr) for name in names if (r := runs.get(name)) and r.n]
                for group, runs in self._groups.items()}

    def results(self) -> list[MetricValue]:
        """Every metric over the items without ``error`` ([] if none scored)."""
        names = self._names()
        results: list[MetricValue] = []
        for name in names:
            overall = self._overall.get(name)
            if overall is None or not overall.n:
                continue
            stderr = overall.stderr
            if self._groups:
                runs = [g[name] for g in self._groups.values() if name in g]
                stderr = pooled_stderr([r.stderr or 0.0 for r in runs], [r.n for r in runs])
            results.append(MetricValue(name, overall.mean, stderr, overall.interval))
        if self._groups:
            label = self.task.group_name or self.task.group_field
            for name in names:
                runs = [g[name] for g in self._groups.values() if name in g]
                if not runs:
                    continue
                stderrs = [r.stderr for r in runs]
                stderr = (math.sqrt(math.fsum(se**2 for se in stderrs if se is not None)) / len(runs)
                          if all(se is not None for se in stderrs) else None)
                results.append(MetricValue(f"{name}_{label}_mean", mean([r.mean for r in runs]), stderr))
        return results


def tally(task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None = None) -> MetricTally:
    """A MetricTally of ``items``."""
    counted = MetricTally(task, scoring)
    for item in items:
        counted.add(item)
    return counted


def group_metrics(
    task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None = None
) -> dict[str, list[MetricValue]]:
    """Per-group metrics (e.g. per MMLU subject), groups in first-seen order; {} for ungrouped tasks."""
    return tally(task, items, scoring).group_results()


def aggregate(task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None = None) -> list[MetricValue]:
    """Mean and stderr of each metric over the items without ``error`` (see MetricTally)."""
    return tally(task, items, scoring).results()
