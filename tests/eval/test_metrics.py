"""Per-item metrics and aggregation, checked against lm-evaluation-harness definitions."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from llmlab_fixtures.eval.metrics import (
    acc,
    acc_norm,
    aggregate,
    apply_filter,
    argmax,
    binary_interval,
    cut_at_stop,
    error_count,
    exact_match,
    group_metrics,
    mc2,
    mean_stderr,
    normalize_answer,
    parse_choice_letter,
    pooled_stderr,
    regex_filter,
    wilson_interval,
)
from llmlab_fixtures.eval.records import ItemRecord
from llmlab_fixtures.tasks import get_task

GSM8K = get_task("gsm8k")
STRICT, FLEXIBLE = GSM8K.filters
EM = GSM8K.exact_match
LETTERS = "ABCDEFGHIJKLM"


def _gold(number: str) -> str:
    return f"Some working.\nMore working <<1+1=2>>2.\n#### {number}"


# --- GSM8K answer extraction ----------------------------------------------------------------


def _fmt(value: int, *, commas: bool, dollar: bool, period: bool) -> str:
    text = f"{abs(value):,}" if commas else str(abs(value))
    text = ("$" if dollar else "") + text
    text = ("-" if value < 0 else "") + text
    return text + ("." if period else "")


@given(
    value=st.integers(min_value=-(10**9), max_value=10**9),
    commas=st.booleans(),
    dollar=st.booleans(),
    period=st.booleans(),
)
def test_flexible_extract_matches_gold_however_the_number_is_written(value, commas, dollar, period):
    reply = f" She pays 3 + 4 = 7 for it.\nSo the total is {_fmt(value, commas=commas, dollar=dollar, period=period)}"
    extracted = apply_filter(reply, FLEXIBLE)
    assert exact_match(extracted, _gold(str(value)), EM) == 1.0


@given(value=st.integers(min_value=-(10**9), max_value=10**9), commas=st.booleans())
def test_strict_match_reads_the_hash_line(value, commas):
    number = _fmt(value, commas=commas, dollar=False, period=False)
    reply = f" First 12 + 30 = 42.\n#### {number}\n\nextra 99"
    assert apply_filter(reply, STRICT) == number
    assert exact_match(apply_filter(reply, STRICT), _gold(str(value)), EM) == 1.0


@given(whole=st.integers(min_value=0, max_value=10**6), frac=st.integers(min_value=1, max_value=99))
def test_decimals_compare_as_written(whole, frac):
    number = f"{whole}.{frac}"
    assert exact_match(apply_filter(f"The answer is {number}", FLEXIBLE), _gold(number), EM) == 1.0
    assert exact_match(apply_filter(f"#### {number}", STRICT), _gold(number), EM) == 1.0


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=80))
def test_no_digits_means_invalid(text):
    assume("#" not in text)
    assert apply_filter(text, STRICT) == "[invalid]"
    extracted = apply_filter(text, FLEXIBLE)
    assert extracted == "[invalid]" or set(extracted) <= set("$.,-")


def test_filters_follow_lm_eval_examples():
    reply = " Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18\n\nQuestion"
    assert apply_filter(reply, STRICT) == "18"
    assert apply_filter(reply, FLEXIBLE) == "18"
    # strict takes the first "#### n", flexible the last number-like token
    assert apply_filter("#### 5 then #### 6 and 7", STRICT) == "5"
    assert apply_filter("#### 5 then #### 6 and 7", FLEXIBLE) == "7"
    # tuple matches: the first non-empty group
    assert regex_filter("x 3 y", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "3"
    assert apply_filter("no number here", FLEXIBLE) == "[invalid]"


def test_exact_match_normalisation():
    assert normalize_answer(_gold("1,234"), EM) == "1234"
    assert normalize_answer("$1,234.", EM) == "1234"
    assert exact_match("18", "#### 18", EM) == 1.0
    assert exact_match("18.0", "#### 18", EM) == 0.0  # lm-eval compares strings, not numbers
    assert exact_match("[invalid]", "#### 18", EM) == 0.0


def test_cut_at_stop():
    assert cut_at_stop(" 42\n\nQuestion: next", ("Question:", "</s>")) == " 42\n\n"
    assert cut_at_stop("B\nC", ("\n",)) == "B"
    assert cut_at_stop("abc", ()) == "abc"


# --- letter parsing ----------------------------------------------------------------------------

_TEMPLATES = [
    "{L}",
    " {L}",
    "{L}.",
    "({L})",
    "{L})",
    "[{L}]",
    "**{L}**",
    "The answer is {L}",
    "The answer is ({L}).",
    "Answer: {L}",
    "answer: {L}. Because it is right.",
    "I think the answer is {L}",
    "Option {L}",
    "{L}. some option text",
]


@given(data=st.data(), n=st.integers(min_value=2, max_value=13), template=st.sampled_from(_TEMPLATES))
def test_parse_choice_letter_finds_the_letter(data, n, template):
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    assert parse_choice_letter(template.format(L=LETTERS[index]), n) == index


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz .,!?\t", max_size=60))
def test_parse_choice_letter_none_without_a_capital_letter(text):
    assert parse_choice_letter(text, 4) is None


def test_parse_choice_letter_edge_cases():
    assert parse_choice_letter("E", 4) is None  # out of range
    assert parse_choice_letter("A cat sat. B", 4) == 1  # "A" as an article
    assert parse_choice_letter("A is correct", 4) == 0
    assert parse_choice_letter("I believe C", 13) == 2  # "I" as a pronoun
    assert parse_choice_letter("BAD", 4) is None  # not standalone
    assert parse_choice_letter("", 4) is None
    assert parse_choice_letter("B", 0) is None


# --- log-likelihood multiple choice --------------------------------------------------------------

lls_strategy = st.lists(st.floats(min_value=-200, max_value=0, allow_nan=False), min_size=1, max_size=8)


@given(lls=lls_strategy)
def test_argmax_is_numpy_like(lls):
    best = argmax(lls)
    assert lls[best] == max(lls)
    assert best == lls.index(max(lls))  # first index on ties


@given(data=st.data(), lls=lls_strategy)
def test_acc_norm_divides_by_character_length(data, lls):
    choices = data.draw(st.lists(st.text(min_size=1, max_size=30), min_size=len(lls), max_size=len(lls)))
    gold = data.draw(st.integers(min_value=0, max_value=len(lls) - 1))
    scores = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    expected = 1.0 if scores.index(max(scores)) == gold else 0.0
    assert acc_norm(lls, choices, gold) == expected
    assert acc(lls, gold) == (1.0 if lls.index(max(lls)) == gold else 0.0)


def test_acc_and_acc_norm_can_disagree():
    choices = ["no", "a much longer answer"]
    lls = [-3.0, -5.0]  # the short one is more likely in total, the long one per character
    assert acc(lls, 0) == 1.0
    assert acc_norm(lls, choices, 1) == 1.0


@given(data=st.data(), lls=st.lists(st.floats(min_value=-50, max_value=0), min_size=2, max_size=10))
def test_mc2_is_normalised_true_mass(data, lls):
    labels = data.draw(st.lists(st.sampled_from([0, 1]), min_size=len(lls), max_size=len(lls)))
    assume(1 in labels)
    value = mc2(lls, labels)
    probs = [math.exp(x) for x in lls]
    naive = sum(p for p, label in zip(probs, labels, strict=True) if label == 1) / sum(probs)
    assert 0.0 <= value <= 1.0 + 1e-12
    assert value == pytest.approx(naive, rel=1e-9, abs=1e-12)
    shift = data.draw(st.floats(min_value=-500, max_value=500))
    assert mc2([x + shift for x in lls], labels) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_mc2_matches_lm_eval_split_index_form_and_survives_underflow():
    lls, labels = [-1.0, -2.0, -0.5, -3.0], [1, 1, 0, 0]
    split = labels.index(0)  # lm-eval: everything before the first 0 is true
    p = [math.exp(x) for x in lls]
    assert mc2(lls, labels) == pytest.approx(sum(p[:split]) / sum(p))
    assert mc2([-900.0, -901.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert mc2([-1.0, -1.0], [1, 1]) == 1.0


# --- standard errors and aggregation ------------------------------------------------------------


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=200))
def test_mean_stderr_is_sample_std_over_sqrt_n(values):
    assert mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), abs=1e-12)


def test_mean_stderr_undefined_for_one_value():
    assert mean_stderr([1.0]) is None
    assert mean_stderr([]) is None


def test_pooled_stderr_formula():
    # lm-eval pooled_sample_stderr: sqrt(sum((n-1) * se^2 * n) / (N - k) / N)
    stderrs, sizes = [0.1, 0.2], [10, 30]
    expected = math.sqrt((9 * 0.01 * 10 + 29 * 0.04 * 30) / (40 - 2) / 40)
    assert pooled_stderr(stderrs, sizes) == pytest.approx(expected)
    assert pooled_stderr([0.0], [1]) is None


def _item(metrics, group=None, error=None):
    return ItemRecord(
        model="m",
        backend="b",
        dataset="d",
        item_id="x",
        prediction=None,
        gold=None,
        correct=None,
        metrics=metrics,
        group=group,
        error=error,
    )


def test_aggregate_excludes_errors():
    task = get_task("arc_easy")
    items = [
        _item({"acc": 1.0, "acc_norm": 0.0}),
        _item({"acc": 0.0, "acc_norm": 1.0}),
        _item({"acc": 1.0, "acc_norm": 1.0}),
        _item({}, error="RuntimeError: boom"),
    ]
    metrics = {m.name: m for m in aggregate(task, items, "loglik")}
    assert list(metrics) == ["acc", "acc_norm"]
    assert metrics["acc"].value == pytest.approx(2 / 3)
    assert metrics["acc"].stderr == pytest.approx(statistics.stdev([1, 0, 1]) / math.sqrt(3))
    assert error_count(items) == 1
    assert aggregate(task, [_item({}, error="x")], "loglik") == []


def test_aggregate_mmlu_weighted_and_subject_mean():
    task = get_task("mmlu")
    items = [_item({"acc": v}, group="anatomy") for v in (1.0, 1.0, 1.0, 0.0)]
    items += [_item({"acc": v}, group="virology") for v in (0.0, 1.0)]
    metrics = {m.name: m for m in aggregate(task, items)}
    assert metrics["acc"].value == pytest.approx(4 / 6)  # question-weighted, like lm-eval's group score
    assert metrics["acc_subject_mean"].value == pytest.approx((0.75 + 0.5) / 2)
    groups = group_metrics(task, items)
    se_a = statistics.stdev([1, 1, 1, 0]) / 2
    se_v = statistics.stdev([0, 1]) / math.sqrt(2)
    assert groups["anatomy"][0].stderr == pytest.approx(se_a)
    assert metrics["acc"].stderr == pytest.approx(pooled_stderr([se_a, se_v], [4, 2]))
    assert metrics["acc_subject_mean"].stderr == pytest.approx(math.sqrt(se_a**2 + se_v**2) / 2)


# --- confidence intervals ------------------------------------------------------------------------


@given(n=st.integers(min_value=1, max_value=100_000), data=st.data())
def test_wilson_interval_is_a_proper_interval_around_the_proportion(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(min_value=0, max_value=n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert high - low > 0  # never empty, even at 0 or n successes
    mirror_low, mirror_high = wilson_interval(n - k, n)  # symmetric under relabelling right/wrong
    assert mirror_low == pytest.approx(1 - high, abs=1e-12) and mirror_high == pytest.approx(1 - low, abs=1e-12)


@given(p=st.floats(min_value=0.05, max_value=0.95), n=st.integers(min_value=10, max_value=10_000))
def test_wilson_interval_narrows_as_items_grow(p: float, n: int) -> None:
    k = round(p * n)
    low, high = wilson_interval(k, n)
    low4, high4 = wilson_interval(4 * k, 4 * n)
    assert high4 - low4 < high - low


def test_wilson_interval_reference_values() -> None:
    # Wilson (1927) / Newcombe (1998) table: 81 of 263 -> 0.2553..0.3662; 0 of 10 -> 0..0.2775
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(0, 0) is None


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=500))
def test_accuracy_interval_contains_the_accuracy(values: list[float]) -> None:
    low, high = binary_interval(values)
    assert low <= sum(values) / len(values) <= high
    assert binary_interval([*values, 0.5]) is None  # only for right/wrong metrics
