"""Registered ``process_docs`` functions that task YAMLs name (lm-evaluation-harness ``utils.process_docs``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Doc = dict[str, Any]
ProcessDocs = Callable[[Doc], Doc]

_REGISTRY: dict[str, ProcessDocs] = {}


def register(name: str) -> Callable[[ProcessDocs], ProcessDocs]:
    """Register a per-document preprocessing function under ``name``."""

    def decorator(fn: ProcessDocs) -> ProcessDocs:
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_process_docs(name: str) -> ProcessDocs:
    """The function registered as ``name``; KeyError if there is none."""
    return _REGISTRY[name]


def registered_names() -> list[str]:
    """Names of all registered preprocessing functions."""
    return sorted(_REGISTRY)


_BRACKETED = re.compile(r"\[.*?\]")


def hellaswag_preprocess(text: str) -> str:
    """Clean WikiHow artefacts exactly like lm-eval's hellaswag ``preprocess``."""
    text = text.strip()
    # The bracketed tags ([title], [step], [header], ...) come from the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


@register("hellaswag")
def hellaswag(doc: Doc) -> Doc:
    """Add ``query``, ``choices`` and ``gold`` to a raw HellaSwag row (the original fields are kept)."""
    # str.capitalize also lowercases the rest of ctx_b, as in lm-eval.
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }
