"""Task definitions, prompts against the real data mirror, and the evaluator with a tiny rule-based model."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.eval.datasets import load_docs
from llmlab_fixtures.eval.evaluator import evaluate
from llmlab_fixtures.eval.metrics import aggregate
from llmlab_fixtures.eval.prompts import (
    ExemplarSampler,
    build_context,
    choice_order,
    continuations,
    generation_request,
    letter_prompt,
    letter_request,
    loglikelihood_requests,
)
from llmlab_fixtures.eval.records import ItemRecord
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)
from llmlab_fixtures.tasks import get_task, list_tasks
from llmlab_fixtures.tasks.definitions import load_task_file

ALL_TASKS = ["arc_challenge", "arc_easy", "gsm8k", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"]

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


# --- registry ---------------------------------------------------------------------------------


def test_all_tasks_are_registered():
    assert list_tasks() == ALL_TASKS
    for name in ALL_TASKS:
        task = get_task(name)
        assert task.name == name
        assert task.prompt_version
        assert task.source is not None and task.source.name == f"{name}.yaml"


def test_unknown_task_lists_known_tasks_and_close_matches():
    with pytest.raises(ConfigError) as info:
        get_task("arc_chalenge")
    message = str(info.value)
    assert "known tasks: arc_challenge, arc_easy, gsm8k" in message
    assert "Did you mean arc_challenge" in message
    with pytest.raises(ConfigError, match="gsm8k"):
        get_task("gsm8")


def test_arc_challenge_is_arc_easy_with_its_own_subset() -> None:
    easy, challenge = get_task("arc_easy"), get_task("arc_challenge")
    assert "include: arc_easy.yaml" in challenge.source.read_text()
    assert (challenge.name, challenge.dataset_name, challenge.local_path) == ("arc_challenge", "ARC-Challenge",
                                                                             "arc/ARC-Challenge")
    assert challenge.doc_to_text == easy.doc_to_text and challenge.generate == easy.generate


def test_include_overrides_top_level_keys_and_refuses_loops(tmp_path: Path) -> None:
    base = get_task("arc_easy").source
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(f"include: {base}\ntask: my_arc\nnum_fewshot: 3\n")
    mine = load_task_file(tmp_path / "sub" / "mine.yaml")
    assert (mine.name, mine.num_fewshot, mine.dataset_name) == ("my_arc", 3, "ARC-Easy")
    (tmp_path / "a.yaml").write_text("include: b.yaml\ntask: a\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\ntask: b\n")
    with pytest.raises(ConfigError, match=r"b.yaml: include 'a.yaml' loops back to a file that includes it"):
        load_task_file(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"cannot read task file .*missing\.yaml"):
        load_task_file(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("name", "split", "fewshot_split", "shots", "metrics"),
    [
        ("arc_challenge", "test", "train", 0, ["acc", "acc_norm"]),
        ("arc_easy", "test", "train", 0, ["acc", "acc_norm"]),
        ("hellaswag", "validation", "train", 0, ["acc", "acc_norm"]),
        ("mmlu", "test", "dev", 0, ["acc"]),
        ("truthfulqa_mc1", "validation", "validation", 0, ["acc"]),
        ("truthfulqa_mc2", "validation", "validation", 0, ["acc"]),
        ("gsm8k", "test", "train", 5, ["exact_match_strict", "exact_match_flexible"]),
    ],
)
def test_task_facts(name, split, fewshot_split, shots, metrics):
    task = get_task(name)
    assert (task.eval_split, task.fewshot_split, task.num_fewshot) == (split, fewshot_split, shots)
    assert [m.name for m in task.metrics] == metrics
    assert task.target_delimiter == " " and task.fewshot_delimiter == "\n\n"


def test_generation_scoring_support():
    assert "log-likelihood" in get_task("truthfulqa_mc2").unsupported_reason("generate")
    for name in ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "truthfulqa_mc1", "gsm8k"):
        assert get_task(name).unsupported_reason("generate") is None
        assert get_task(name).unsupported_reason("loglik") is None
    assert get_task("gsm8k").effective_scoring("loglik") == "generate"
    assert get_task("arc_easy").prompt_version_for("generate").endswith("+letters-v1")


# --- prompts on the real data -------------------------------------------------------------------


def test_arc_challenge_first_item(data_dir: Path):
    task = get_task("arc_challenge")
    doc = load_docs(task, data_dir)[0]
    assert task.doc_id(doc) == "Mercury_7175875"
    assert build_context(task, doc) == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert continuations(task, doc) == [
        " Planetary density will decrease.",
        " Planetary years will become longer.",
        " Planetary days will become shorter.",
        " Planetary gravity will become stronger.",
    ]
    assert task.target(doc) == 2  # answerKey C
    requests = loglikelihood_requests(task, doc)
    assert {r.context for r in requests} == {build_context(task, doc)}


def test_arc_numeric_labels_and_five_choices(data_dir: Path):
    docs = load_docs(get_task("arc_challenge"), data_dir)
    task = get_task("arc_challenge")
    numeric = next(d for d in docs if d["answerKey"].isdigit())
    assert task.target(numeric) == numeric["choices"]["label"].index(numeric["answerKey"])
    five = next(d for d in docs if len(d["choices"]["text"]) == 5)
    assert len(continuations(task, five)) == 5
    assert "\nE. " in letter_prompt(task, five)


def test_arc_letter_prompt(data_dir: Path):
    task = get_task("arc_challenge")
    doc = load_docs(task, data_dir)[0]
    request = letter_request(task, doc)
    assert request.prompt == (
        "Answer the question with the letter of the correct option only.\n\n"
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\n"
        "A. Planetary density will decrease.\nB. Planetary years will become longer.\n"
        "C. Planetary days will become shorter.\nD. Planetary gravity will become stronger.\nAnswer:"
    )
    assert request.stop == ("\n",)
    assert request.max_new_tokens <= 16


def test_hellaswag_wikihow_item_is_preprocessed(data_dir: Path):
    task = get_task("hellaswag")
    doc = next(d for d in load_docs(task, data_dir) if d["ind"] == 11)
    assert doc["source_id"].startswith("wikihow")
    assert task.doc_id(doc) == "11"
    assert build_context(task, doc) == (
        "Personal Care and Style: How to do monochromatic makeup. Choose a base color that complements your "
        "skin tone. Colors that work great for the monochromatic look are red, pink, bronze, brown, nude and "
        "orange. However, if you are feeling extra adventurous, you can also choose purple, grey, blue or even "
        "green as your base color."
    )
    assert task.choices(doc) == [
        "Don't worry if you are wearing different colors all the time, because wearing the same base color "
        "everyday will bring more attention to your eyes.. Choose a shimmery eyeshadow.",
        " Stick to one color or a variety of colors that pair well with your skin tone. For example, if you "
        "have fair skin, go for purple and orange.",
        " For example, if you have a neutral complexion, choose salmon, yellow or light pink as your base "
        "color. If you have a yellowish complexion, go for icy yellow.",
        "The colors that work best for you will depend on whether your skin has warm, cool, or neutral "
        'undertones. If your skin has greenish, olive, or golden undertones, your skin tone is " warm.',
    ]
    assert task.target(doc) == 3


def test_hellaswag_activitynet_item_capitalizes_ctx_b(data_dir: Path):
    task = get_task("hellaswag")
    doc = load_docs(task, data_dir)[0]
    assert build_context(task, doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert continuations(task, doc)[3] == " starts pulling up roofing on a roof."
    assert task.target(doc) == 3
    # str.capitalize lowercases the rest, exactly as lm-eval does
    raw = {**doc, "ctx_a": "Two men talk.", "ctx_b": "the Man in RED"}
    from llmlab_fixtures.tasks.preprocess import hellaswag

    assert hellaswag(raw)["query"] == "Roof shingle removal: Two men talk. The man in red"


MMLU_ABSTRACT_ALGEBRA_5_SHOT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
    "D. False, True\nAnswer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The "
    "symmetric group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every "
    "subgroup of an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\n"
    "D. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
)


def test_mmlu_five_shot_uses_first_dev_rows_of_the_same_subject(data_dir: Path):
    task = get_task("mmlu")
    docs = load_docs(task, data_dir)
    dev = load_docs(task, data_dir, split="dev")
    sampler = ExemplarSampler(task, dev, 5)
    assert build_context(task, docs[0], sampler.exemplars(docs[0])) == MMLU_ABSTRACT_ALGEBRA_5_SHOT
    assert continuations(task, docs[0]) == [" A", " B", " C", " D"]
    assert task.doc_id(docs[0]) == "abstract_algebra/0"
    anatomy = next(d for d in docs if d["subject"] == "anatomy")
    assert task.doc_id(anatomy) == "anatomy/0"
    shots = sampler.exemplars(anatomy)
    assert [d["subject"] for d in shots] == ["anatomy"] * 5
    assert shots == [d for d in dev if d["subject"] == "anatomy"][:5]
    assert build_context(task, anatomy).startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert task.group(anatomy) == "anatomy"


def test_mmlu_letter_prompt_shows_the_answer_texts(data_dir: Path):
    task = get_task("mmlu")
    doc = load_docs(task, data_dir)[0]
    assert letter_prompt(task, doc) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Answer each question with the letter of the correct option only.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )


# Verified against lm-eval-rendered GSM8K 5-shot prompts for test docs 0 and 1 (default sampler, seed 1234).
GSM8K_DOC0_SHOTS = [6374, 3610, 957, 61, 742]
GSM8K_DOC1_SHOTS = [7462, 6610, 4769, 286, 5501]


def test_gsm8k_exemplar_draw_matches_lm_eval(data_dir: Path):
    task = get_task("gsm8k")
    docs = load_docs(task, data_dir)
    train = load_docs(task, data_dir, split="train")
    sampler = ExemplarSampler(task, train, 5, seed=1234)
    shots0 = sampler.exemplars(docs[0])
    shots1 = sampler.exemplars(docs[1])
    assert [d["_row"] for d in shots0] == GSM8K_DOC0_SHOTS
    assert [d["_row"] for d in shots1] == GSM8K_DOC1_SHOTS
    assert shots0[0]["question"].startswith("Jen and Tyler are gymnasts practicing flips.")
    assert shots1[0]["question"].startswith("Steve finds 100 gold bars while visiting Oregon.")
    context = build_context(task, docs[0], shots0)
    assert context.startswith(
        "Question: Jen and Tyler are gymnasts practicing flips. Jen is practicing the triple-flip while Tyler "
        "is practicing the double-flip. Jen did sixteen triple-flips during practice. Tyler flipped in the air "
        "half the number of times Jen did. How many double-flips did Tyler do?\nAnswer: Jen did 16 "
        "triple-flips, so she did 16 * 3 = <<16*3=48>>48 flips.\n"
    )
    assert "double-flips.\n#### 12\n\nQuestion: Four people in a law firm" in context
    assert context.endswith(
        "#### 84\n\nQuestion: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning "
        "and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market "
        "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?"
        "\nAnswer:"
    )
    request = generation_request(task, docs[0], shots0)
    assert request.stop == ("Question:", "</s>", "<|im_end|>")
    assert request.max_new_tokens == 256


def test_gsm8k_fixed_fewshot_reuses_one_draw(data_dir: Path):
    task = get_task("gsm8k")
    docs = load_docs(task, data_dir)
    train = load_docs(task, data_dir, split="train")
    sampler = ExemplarSampler(task, train, 5, seed=1234, fixed=True)
    first = sampler.exemplars(docs[0])
    assert all(sampler.exemplars(doc) == first for doc in docs[1:20])
    assert [d["_row"] for d in first] == GSM8K_DOC0_SHOTS  # the first draw of Random(1234)


def test_sampler_draws_one_extra_where_lm_eval_does(data_dir: Path):
    import random

    hellaswag = get_task("hellaswag")  # lm-eval: fewshot_split == test_split (both null) -> n + 1 draws
    assert hellaswag.fewshot_draws_extra and not get_task("gsm8k").fewshot_draws_extra
    pool = load_docs(hellaswag, data_dir)[100:400]  # stands in for the train split, absent from the mirror
    docs = load_docs(hellaswag, data_dir)[:5]
    sampler = ExemplarSampler(hellaswag, pool, 3, seed=1234)
    rnd = random.Random(1234)
    for doc in docs:
        assert sampler.exemplars(doc) == rnd.sample(pool, 4)[:3]

    truthfulqa = get_task("truthfulqa_mc1")  # few-shot docs come from the evaluated split itself
    docs = load_docs(truthfulqa, data_dir)[:3]
    sampler = ExemplarSampler(truthfulqa, docs, 2)
    for doc in docs:
        shots = sampler.exemplars(doc)
        assert len(shots) == 2 and doc not in shots


def test_fewshot_needs_docs_and_enough_of_them(data_dir: Path):
    task = get_task("gsm8k")
    with pytest.raises(ConfigError, match="few-shot"):
        ExemplarSampler(task, None, 5)
    mmlu = get_task("mmlu")
    dev = load_docs(mmlu, data_dir, split="dev")
    sampler = ExemplarSampler(mmlu, dev, 6)
    with pytest.raises(ConfigError, match="lower --num-fewshot"):
        sampler.exemplars(load_docs(mmlu, data_dir)[0])


@pytest.mark.parametrize("name", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_primer(name: str, data_dir: Path):
    task = get_task(name)
    doc = load_docs(task, data_dir)[0]
    question = "What is the smallest country in the world that is at least one square mile in area?"
    assert build_context(task, doc) == TRUTHFULQA_PRIMER + f"\n\nQ: {question}\nA:"
    assert task.target(doc) == 0
    assert (
        continuations(task, doc)[0]
        == " Nauru is the smallest country in the world that is at least one square mile in area."
    )
    assert task.doc_id(doc) == "0"
    if name == "truthfulqa_mc2":
        assert task.labels(doc) == doc["mc2_targets"]["labels"]
        assert task.labels(doc)[0] == 1


def test_truthfulqa_mc1_letter_options_are_shuffled_per_item(data_dir: Path):
    task = get_task("truthfulqa_mc1")
    docs = load_docs(task, data_dir)[:50]
    orders = [choice_order(task, len(task.choices(d)), task.doc_id(d)) for d in docs]
    for doc, order in zip(docs, orders, strict=True):
        assert sorted(order) == list(range(len(task.choices(doc))))
        assert order == choice_order(task, len(task.choices(doc)), task.doc_id(doc))  # deterministic
    assert len({order.index(0) for order in orders}) > 1  # the true answer is not always shown first
    assert choice_order(get_task("arc_easy"), 4, "x") == [0, 1, 2, 3]


# --- the evaluator, with a tiny deterministic model -------------------------------------------


class RuleModel(Provider):
    """A test double for the *model*: scores and answers by fixed rules, never touches the network."""

    backend = "rule"

    def __init__(
        self,
        *,
        loglik: Callable[[LoglikelihoodRequest], float] | None = None,
        reply: Callable[[str], str] | None = None,
        fail_on: Callable[[str], bool] | None = None,
    ) -> None:
        self._loglik = loglik
        self._reply = reply
        self._fail_on = fail_on or (lambda _prompt: False)
        self.supports_loglikelihood = loglik is not None
        self.loglik_calls: list[list[LoglikelihoodRequest]] = []
        self.generate_calls: list[GenerationRequest] = []

    def initialize(self) -> None:
        pass

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        if self._loglik is None:
            return super().loglikelihood(requests)
        self.loglik_calls.append(list(requests))
        if self._fail_on(requests[0].context):
            raise RuntimeError("backend crashed")
        return [
            LoglikelihoodResult(
                logprob=self._loglik(r),
                is_greedy=False,
                context_tokens=len(r.context.split()),
                continuation_tokens=len(r.continuation.split()),
                evaluated_tokens=len(r.continuation.split()) + (len(r.context.split()) if i == 0 else 0),
            )
            for i, r in enumerate(requests)
        ]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        assert self._reply is not None
        self.generate_calls.append(request)
        if self._fail_on(request.prompt):
            raise RuntimeError("backend crashed")
        text = self._reply(request.prompt)
        return GenerationResult(
            text=text,
            prompt_tokens=len(request.prompt.split()),
            completion_tokens=len(text.split()),
            ttft_s=0.01,
            total_s=0.02,
            evaluated_tokens=len(request.prompt.split()),
        )

    def get_model_info(self) -> ModelInfo:
        return ModelInfo(name="rule", backend=self.backend)

    def estimate_memory(self) -> int:
        return 0


def _by_length(request: LoglikelihoodRequest) -> float:
    """Log-likelihood -(characters): acc picks the shortest choice, acc_norm the longest."""
    return -float(len(request.continuation))


def test_evaluate_loglik_arc(data_dir: Path):
    task = get_task("arc_easy")
    docs = load_docs(task, data_dir)[:30]
    model = RuleModel(loglik=_by_length)
    seen: list[ItemRecord] = []
    progress: list[tuple[int, int]] = []
    run = evaluate(
        task,
        model,
        docs,
        model_name="rule-model",
        fewshot_docs=None,
        scoring="loglik",
        num_fewshot=None,
        on_item=seen.append,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert [i.item_id for i in run.items] == [d["id"] for d in docs]
    assert seen == run.items
    assert progress[-1] == (30, 30) and len(progress) == 30
    assert len(model.loglik_calls) == 30  # one call per item, holding all its choices
    assert (run.scoring, run.num_fewshot, run.dataset, run.model) == ("loglik", 0, "arc_easy", "rule-model")
    assert run.prompt_version == task.prompt_version
    for item, doc in zip(run.items, docs, strict=True):
        choices = task.choices(doc)
        lengths = [len(c) for c in choices]
        shortest = lengths.index(min(lengths))
        longest = lengths.index(max(lengths))
        assert item.prediction == longest  # the choice acc_norm (the primary metric) picks
        assert item.gold == task.target(doc)
        assert item.metrics["acc"] == float(shortest == item.gold)
        assert item.metrics["acc_norm"] == float(longest == item.gold)
        assert item.correct == (item.metrics["acc_norm"] == 1.0)  # the task's primary metric
        assert item.loglikelihoods == [-(len(c) + 1.0) for c in choices]
        assert item.prompt_tokens > item.evaluated_tokens > 0
        assert item.completion_tokens == 0 and item.error is None
    metrics = {m.name: m.value for m in run.metrics}
    assert metrics["acc"] == pytest.approx(sum(i.metrics["acc"] for i in run.items) / 30)
    assert metrics["acc_norm"] == pytest.approx(sum(i.metrics["acc_norm"] for i in run.items) / 30)


def test_windowed_scoring_reports_progress_once_per_finished_block(data_dir: Path):
    """Items scored together finish together: progress counts the whole block, not its first item."""
    task = get_task("arc_easy")
    docs = load_docs(task, data_dir)[:30]
    model = RuleModel(loglik=_by_length)
    model.loglik_items_per_call = 4  # blocks of 4 windows: 16 items
    progress: list[tuple[int, int]] = []
    seen: list[ItemRecord] = []
    run = evaluate(task, model, docs, model_name="rule-model", fewshot_docs=None, scoring="loglik", num_fewshot=None,
                   on_item=seen.append, progress=lambda done, total: progress.append((done, total)))
    assert progress == [(16, 30), (30, 30)]
    assert [i.item_id for i in seen] == [i.item_id for i in run.items] == [d["id"] for d in docs]
    assert len(model.loglik_calls) == 8  # 4 items a call


def test_evaluate_records_provider_errors_and_goes_on(data_dir: Path):
    task = get_task("arc_challenge")
    docs = load_docs(task, data_dir)[:5]
    bad = docs[1]["question"]
    model = RuleModel(loglik=_by_length, fail_on=lambda context: bad in context)
    run = evaluate(task, model, docs, model_name="m", fewshot_docs=None, scoring="loglik", num_fewshot=0)
    errors = [i for i in run.items if i.error]
    assert [i.item_id for i in errors] == [docs[1]["id"]]
    assert errors[0].error == "RuntimeError: backend crashed"
    assert errors[0].metrics == {} and errors[0].correct is None
    acc = next(m for m in run.metrics if m.name == "acc")
    assert acc.value == pytest.approx(sum(i.metrics["acc"] for i in run.items if not i.error) / 4)


def test_evaluate_loglik_needs_a_loglik_backend(data_dir: Path):
    task = get_task("hellaswag")
    docs = load_docs(task, data_dir)[:2]
    model = RuleModel(reply=lambda prompt: "A")
    with pytest.raises(ConfigError, match="--scoring generate"):
        evaluate(task, model, docs, model_name="m", fewshot_docs=None, scoring="loglik", num_fewshot=None)


def test_evaluate_mc2_probability_mass(data_dir: Path):
    task = get_task("truthfulqa_mc2")
    docs = load_docs(task, data_dir)[:10]
    truths = {
        c for d in docs for c, lab in zip(d["mc2_targets"]["choices"], d["mc2_targets"]["labels"], strict=True) if lab
    }

    def loglik(request: LoglikelihoodRequest) -> float:
        return -1.0 if request.continuation[1:] in truths else -2.0

    run = evaluate(
        task, RuleModel(loglik=loglik), docs, model_name="m", fewshot_docs=None, scoring="loglik", num_fewshot=None
    )
    for item, doc in zip(run.items, docs, strict=True):
        labels = doc["mc2_targets"]["labels"]
        n_true, n_false = labels.count(1), labels.count(0)
        e1, e2 = 2.718281828459045**-1, 2.718281828459045**-2
        assert item.metrics["acc"] == pytest.approx(n_true * e1 / (n_true * e1 + n_false * e2))
        assert item.correct is True
    with pytest.raises(ConfigError, match="log-likelihood"):
        evaluate(
            task,
            RuleModel(reply=lambda p: "A"),
            docs,
            model_name="m",
            fewshot_docs=None,
            scoring="generate",
            num_fewshot=None,
        )


def _letter_of(answer: str, prompt: str) -> str:
    match = re.search(rf"^([A-Z])\. {re.escape(answer)}$", prompt, re.MULTILINE)
    assert match, answer
    return match.group(1)


def test_evaluate_truthfulqa_mc1_by_generation(data_dir: Path):
    task = get_task("truthfulqa_mc1")
    docs = load_docs(task, data_dir)[:20]
    by_question = {d["question"]: d["mc1_targets"]["choices"][0] for d in docs}

    def reply(prompt: str) -> str:
        question = re.search(r"Question: (.*)\n", prompt).group(1)
        return f" The answer is {_letter_of(by_question[question], prompt)}.\nExplanation follows"

    model = RuleModel(reply=reply)
    run = evaluate(task, model, docs, model_name="m", fewshot_docs=None, scoring="generate", num_fewshot=None)
    assert run.scoring == "generate"
    assert run.prompt_version == task.prompt_version_for("generate")
    assert all(i.prediction == 0 and i.gold == 0 and i.correct for i in run.items)
    assert all(i.response.startswith(" The answer is") and "\n" not in i.response for i in run.items)
    assert all(i.ttft_s == 0.01 and i.completion_tokens > 0 for i in run.items)
    assert [m.name for m in run.metrics] == ["acc"] and run.metrics[0].value == 1.0
    assert all(r.stop == ("\n",) for r in model.generate_calls)


def test_evaluate_unparsable_reply_is_wrong_not_an_error(data_dir: Path):
    task = get_task("arc_easy")
    docs = load_docs(task, data_dir)[:3]
    run = evaluate(
        task,
        RuleModel(reply=lambda p: "no idea"),
        docs,
        model_name="m",
        fewshot_docs=None,
        scoring="generate",
        num_fewshot=0,
    )
    assert all(i.prediction is None and i.correct is False and i.error is None for i in run.items)
    assert run.metrics[0].value == 0.0


def test_evaluate_gsm8k_generation(data_dir: Path):
    task = get_task("gsm8k")
    docs = load_docs(task, data_dir)[:6]
    train = load_docs(task, data_dir, split="train")
    answers = {d["question"]: d["answer"].split("#### ")[-1] for d in docs}

    def reply(prompt: str) -> str:
        question = prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
        number = answers[question]
        if question == docs[0]["question"]:
            return f" Some steps give 5 apples.\nSo she makes ${number} a day.\n\nQuestion: next one"  # no ####
        return f" Work it out: 2 + 2 = 4.\n#### {number}\n\nQuestion: next one"

    model = RuleModel(reply=reply)
    run = evaluate(task, model, docs, model_name="m", fewshot_docs=train, scoring="loglik", num_fewshot=None)
    assert run.scoring == "generate" and run.num_fewshot == 5
    first = run.items[0]
    assert first.metrics == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert first.prediction == "[invalid]" and first.correct is False
    assert first.gold == "18"
    assert first.response.endswith("a day.\n\n")  # cut at the stop string "Question:"
    for item in run.items[1:]:
        assert item.metrics == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
        assert item.correct is True and item.prediction == item.gold
    metrics = {m.name: m.value for m in run.metrics}
    assert metrics == {"exact_match_strict": pytest.approx(5 / 6), "exact_match_flexible": 1.0}
    shots = [req.prompt.count("\n#### ") for req in model.generate_calls]
    assert shots == [5] * 6
    assert model.generate_calls[0].prompt.startswith("Question: Jen and Tyler")


def test_evaluate_mmlu_groups(data_dir: Path):
    task = get_task("mmlu")
    all_docs = load_docs(task, data_dir)
    docs = [d for d in all_docs if d["subject"] == "anatomy"][:3] + [d for d in all_docs if d["subject"] == "virology"][
        :5
    ]

    def loglik(request: LoglikelihoodRequest) -> float:
        return -1.0 if request.continuation == " A" else -3.0

    dev = load_docs(task, data_dir, split="dev")
    model = RuleModel(loglik=loglik)
    run = evaluate(task, model, docs, model_name="m", fewshot_docs=dev, scoring="loglik", num_fewshot=5)
    assert [i.item_id for i in run.items[:4]] == ["anatomy/0", "anatomy/1", "anatomy/2", "virology/0"]
    assert {i.group for i in run.items} == {"anatomy", "virology"}
    assert all(i.prediction == 0 for i in run.items)
    names = [m.name for m in run.metrics]
    assert names == ["acc", "acc_subject_mean"]
    assert model.loglik_calls[0][0].context.count("\nAnswer: ") == 5


def test_streamed_run_keeps_no_records_and_aggregates_the_same(data_dir: Path):
    """keep_items=False (how the plugin runs): records only go to on_item; metrics and totals are unchanged."""
    task = get_task("mmlu")
    docs = load_docs(task, data_dir)[90:150]  # crosses a subject boundary: grouped aggregation
    runs, streamed = [], []
    for keep in (True, False):
        seen: list[ItemRecord] = []
        runs.append(evaluate(task, RuleModel(loglik=_by_length), docs, model_name="rule-model", fewshot_docs=None,
                             scoring="loglik", num_fewshot=0, on_item=seen.append, keep_items=keep))
        streamed.append(seen)
    kept, lean = runs
    assert len(kept.items) == 60 and lean.items == []
    assert [i.item_id for i in streamed[1]] == [i.item_id for i in kept.items]
    assert len({i.group for i in kept.items}) == 2
    expected = aggregate(task, kept.items, "loglik")  # computed from the records, as a reference
    assert [m.name for m in lean.metrics] == [m.name for m in expected] == ["acc", "acc_subject_mean"]
    for got, want in zip(lean.metrics, expected, strict=True):
        assert (got.value, got.stderr) == pytest.approx((want.value, want.stderr), rel=1e-12)
        assert got.ci95 == want.ci95
    assert lean.totals is not None and kept.totals is not None
    assert (lean.totals.n_scored, lean.totals.prompt_tokens, len(lean.totals.latencies)) == (
        60, sum(i.prompt_tokens for i in kept.items), 60)
