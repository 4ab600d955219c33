"""Per-item scoring and aggregation, following lm-evaluation-harness 0.4.x definitions."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from llmlab_fixtures.records import ItemRecord, MetricValue
from llmlab_fixtures.tasks.definitions import ExactMatchSpec, FilterSpec, TaskDefinition

LETTERS = string.ascii_uppercase

# --- statistics ------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (nan for no values)."""
    return math.fsum(values) / len(values) if values else math.nan


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation (ddof=1) / sqrt(n); None for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    variance = math.fsum((x - mu) ** 2 for x in values) / (n - 1)
    return math.sqrt(variance) / math.sqrt(n)


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
    if not values or any(v not in (0.0, 1.0) for v in values):
        return None
    return wilson_interval(int(sum(values)), len(values))


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


def scored_items(items: Sequence[ItemRecord]) -> list[ItemRecord]:
    """Items that produced a score (no ``error``)."""
    return [item for item in items if item.error is None]


def error_count(items: Sequence[ItemRecord]) -> int:
    """Items that failed and are left out of every metric."""
    return sum(1 for item in items if item.error is not None)


def _metric_names(task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None) -> list[str]:
    if scoring is not None:
        return [m.name for m in task.metrics_for(scoring)]
    present: list[str] = []
    for item in items:
        present.extend(name for name in item.metrics if name not in present)
    declared = [m.name for m in task.metrics if m.name in present]
    return declared + [name for name in present if name not in declared]


def group_metrics(
    task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None = None
) -> dict[str, list[MetricValue]]:
    """Per-group metrics (e.g. per MMLU subject), groups in first-seen order; {} for ungrouped tasks."""
    scored = scored_items(items)
    by_group: dict[str, list[ItemRecord]] = {}
    for item in scored:
        if item.group is not None:
            by_group.setdefault(item.group, []).append(item)
    names = _metric_names(task, scored, scoring)
    result: dict[str, list[MetricValue]] = {}
    for group, members in by_group.items():
        values = {name: [i.metrics[name] for i in members if name in i.metrics] for name in names}
        result[group] = [MetricValue(name, mean(v), mean_stderr(v)) for name, v in values.items() if v]
    return result


def aggregate(task: TaskDefinition, items: Sequence[ItemRecord], scoring: str | None = None) -> list[MetricValue]:
    """Mean and stderr of each metric over the items without ``error`` ([] if none scored).

    Grouped tasks (MMLU) report the item-weighted mean with lm-eval's pooled group stderr, plus
    ``<metric>_<group_name>_mean``: the unweighted mean over groups, stderr sqrt(sum se_g^2) / k.
    """
    scored = scored_items(items)
    names = _metric_names(task, scored, scoring)
    groups = group_metrics(task, scored, scoring) if task.group_field else {}
    sizes = {
        group: {name: sum(1 for i in scored if i.group == group and name in i.metrics) for name in names}
        for group in groups
    }
    results: list[MetricValue] = []
    for name in names:
        values = [item.metrics[name] for item in scored if name in item.metrics]
        if not values:
            continue
        if not groups:
            results.append(MetricValue(name, mean(values), mean_stderr(values), binary_interval(values)))
            continue
        per_group = [(m, sizes[g][name]) for g, ms in groups.items() for m in ms if m.name == name]
        stderr = pooled_stderr([m.stderr or 0.0 for m, _ in per_group], [n for _, n in per_group])
        results.append(MetricValue(name, mean(values), stderr, binary_interval(values)))
    if groups:
        label = task.group_name or task.group_field
        for name in names:
            per_group = [m for ms in groups.values() for m in ms if m.name == name]
            if not per_group:
                continue
            stderrs = [m.stderr for m in per_group]
            stderr = (
                math.sqrt(math.fsum(se**2 for se in stderrs if se is not None)) / len(per_group)
                if all(se is not None for se in stderrs)
                else None
            )
            results.append(MetricValue(f"{name}_{label}_mean", mean([m.value for m in per_group]), stderr))
    return results
