"""Document selection for the generated MMLU subject tasks; copied next to the generated YAMLs.

lm-evaluation-harness imports this file (``process_docs: !function llmlab_docs.mmlu_<subject>``). It runs in
lm-eval's own virtual environment, so it imports nothing from llmlab. ``mmlu_selection.json`` (written beside it by
``generate.py``) maps each subject to the number of its test rows to keep (``null``: all of them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SELECTION: dict[str, int | None] = json.loads(Path(__file__).with_name("mmlu_selection.json").read_text())


def _subject_rows(subject: str, test_rows: int | None) -> Callable[[Any], Any]:
    """A ``process_docs`` keeping the rows of ``subject`` in file order; the test split cut to ``test_rows``."""

    def process_docs(dataset: Any) -> Any:
        keep = [index for index, name in enumerate(dataset["subject"]) if name == subject]
        if test_rows is not None and str(dataset.split) == "test":
            keep = keep[:test_rows]
        return dataset.select(keep)

    process_docs.__name__ = f"mmlu_{subject}"
    return process_docs


for _subject, _rows in SELECTION.items():
    globals()[f"mmlu_{_subject}"] = _subject_rows(_subject, _rows)
