"""Prompts from a task definition and a document: few-shot exemplars, contexts, continuations, generation prompts.

Layout (lm-evaluation-harness 0.4.x, no chat template)::

    description + "".join(text(ex) + target_delimiter + target_text(ex) + fewshot_delimiter for ex in shots)
                + text(doc)

and each multiple-choice continuation is ``target_delimiter + choice``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from typing import Any

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.providers.base import GenerationRequest, LoglikelihoodRequest
from llmlab_fixtures.tasks.definitions import TaskDefinition, render_template

Doc = Mapping[str, Any]
LETTERS = string.ascii_uppercase


class ExemplarSampler:
    """Chooses each item's few-shot exemplars the way lm-eval's samplers do.

    ``default``: one ``random.Random(seed)`` shared by the whole run, ``rnd.sample(pool, n)`` per item in
    document order; tasks with ``fewshot_draws_extra`` draw n + 1 and drop the item itself (lm-eval does
    this whenever its ``fewshot_split`` equals its ``test_split``, which includes both being null).
    ``first_n``: the first n docs of the pool. For tasks with a ``group_field`` (MMLU) the pool is the
    few-shot docs of the item's own group. ``fixed=True`` draws once (per group) and reuses those
    exemplars for every item, so a backend can reuse the shared prompt prefix.
    """

    def __init__(
        self,
        task: TaskDefinition,
        fewshot_docs: Sequence[Doc] | None,
        num_fewshot: int,
        *,
        seed: int = 1234,
        fixed: bool = False,
    ) -> None:
        self.task = task
        self.num_fewshot = num_fewshot
        self.fixed = fixed
        self.seed = seed
        self._rnd = random.Random(seed)
        self._pools: dict[str | None, list[Doc]] = {}
        for doc in fewshot_docs or ():
            self._pools.setdefault(task.group(doc), []).append(doc)
        self._fixed: dict[str | None, list[Doc]] = {}
        if num_fewshot > 0 and not fewshot_docs:
            raise ConfigError(
                f"{task.name}: {num_fewshot}-shot prompts need the few-shot split "
                f"{task.fewshot_split!r}, but no few-shot documents were given"
            )

    def _pool(self, doc: Doc) -> list[Doc]:
        group = self.task.group(doc)
        pool = self._pools.get(group, [])
        if len(pool) < self.num_fewshot:
            where = f" for {self.task.group_field} {group!r}" if group is not None else ""
            raise ConfigError(
                f"{self.task.name}: {self.num_fewshot}-shot needs {self.num_fewshot} few-shot documents{where}, "
                f"but split {self.task.fewshot_split!r} has {len(pool)}; lower --num-fewshot"
            )
        return pool

    def _draw(self, doc: Doc, rnd: random.Random) -> list[Doc]:
        pool = self._pool(doc)
        n = min(self.num_fewshot + 1, len(pool)) if self.task.fewshot_draws_extra else self.num_fewshot
        return pool[:n] if self.task.sampler == "first_n" else rnd.sample(pool, n)

    def exemplars(self, doc: Doc) -> list[Doc]:
        """The exemplars for ``doc``; call once per item, in document order (it advances the shared RNG)."""
        if self.num_fewshot <= 0:
            return []
        if self.fixed:
            group = self.task.group(doc)
            if group not in self._fixed:
                # Seeded per group so the fixed set does not depend on which group comes first.
                rnd = random.Random(self.seed if group is None else f"{self.seed}:{group}")
                self._fixed[group] = self._draw(doc, rnd)
            drawn = self._fixed[group]
        else:
            drawn = self._draw(doc, self._rnd)
        # lm-eval drops the evaluated item itself when it was drawn (few-shot docs from the evaluation split)
        return [ex for ex in drawn if ex != doc][: self.num_fewshot]


def fewshot_block(task: TaskDefinition, exemplars: Sequence[Doc]) -> str:
    """The labelled exemplars, each followed by the few-shot delimiter."""
    return "".join(
        task.text(ex) + task.target_delimiter + task.target_text(ex) + task.fewshot_delimiter for ex in exemplars
    )


def build_context(task: TaskDefinition, doc: Doc, exemplars: Sequence[Doc] = ()) -> str:
    """Description + few-shot block + ``doc_to_text(doc)``: the context lm-eval scores or generates from."""
    return task.describe(doc) + fewshot_block(task, exemplars) + task.text(doc)


def continuations(task: TaskDefinition, doc: Doc) -> list[str]:
    """Each choice preceded by the target delimiter, as lm-eval scores them."""
    return [task.target_delimiter + choice for choice in task.choices(doc)]


def loglikelihood_requests(task: TaskDefinition, doc: Doc, exemplars: Sequence[Doc] = ()) -> list[LoglikelihoodRequest]:
    """One request per choice, all sharing the same context."""
    context = build_context(task, doc, exemplars)
    return [LoglikelihoodRequest(context, continuation) for continuation in continuations(task, doc)]


def generation_request(
    task: TaskDefinition, doc: Doc, exemplars: Sequence[Doc] = (), *, max_new_tokens: int | None = None
) -> GenerationRequest:
    """The greedy request of a ``generate_until`` task (GSM8K)."""
    if task.generation is None:
        raise ConfigError(f"{task.name} is not a generation task")
    return GenerationRequest(
        prompt=build_context(task, doc, exemplars),
        stop=task.generation.until,
        max_new_tokens=max_new_tokens or task.generation.max_gen_toks,
    )


def choice_order(task: TaskDefinition, n_choices: int, item_id: str, seed: int = 1234) -> list[int]:
    """Display order of the choices for generation scoring: original order, or a seeded per-item shuffle."""
    order = list(range(n_choices))
    if task.generate is not None and task.generate.shuffle_choices:
        random.Random(f"{seed}:{task.name}:{item_id}").shuffle(order)
    return order


def format_options(choices: Sequence[str], order: Sequence[int] | None = None) -> str:
    """``A. first\\nB. second...`` with the choices shown in ``order``."""
    order = range(len(choices)) if order is None else order
    if len(order) > len(LETTERS):
        raise ConfigError(f"cannot letter {len(order)} choices (at most {len(LETTERS)})")
    return "\n".join(f"{LETTERS[pos]}. {choices[index].strip()}" for pos, index in enumerate(order))


def _lettered(task: TaskDefinition, doc: Doc, order: Sequence[int] | None) -> str:
    assert task.generate is not None
    return render_template(task.generate.template, {**doc, "options": format_options(task.option_texts(doc), order)})


def letter_prompt(
    task: TaskDefinition, doc: Doc, exemplars: Sequence[Doc] = (), order: Sequence[int] | None = None
) -> str:
    """Generation-scoring prompt: description, instruction, lettered exemplars, then the lettered item."""
    if task.generate is None:
        raise ConfigError(task.unsupported_reason("generate") or f"{task.name} has no generation prompt")
    shots = "".join(
        _lettered(task, ex, None) + task.target_delimiter + LETTERS[task.target(ex)] + task.fewshot_delimiter
        for ex in exemplars
    )
    return task.describe(doc) + task.generate.instruction + shots + _lettered(task, doc, order)


def letter_request(
    task: TaskDefinition, doc: Doc, exemplars: Sequence[Doc] = (), order: Sequence[int] | None = None
) -> GenerationRequest:
    """The short greedy request that asks for the letter of the answer."""
    prompt = letter_prompt(task, doc, exemplars, order)
    spec = task.generate
    assert spec is not None  # letter_prompt raised otherwise
    return GenerationRequest(prompt=prompt, stop=spec.stop, max_new_tokens=spec.max_new_tokens)
