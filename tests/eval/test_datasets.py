"""Loading the local JSONL mirror: clear errors with file and line, caching, the Hub fallback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmlab_fixtures.errors import DataError
from llmlab_fixtures.eval import datasets
from llmlab_fixtures.eval.datasets import clear_cache, load_docs, prepare_docs
from llmlab_fixtures.tasks import get_task

ARC_ROW = {
    "id": "Q1",
    "question": "Which is a metal?",
    "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
    "answerKey": "B",
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _write(root: Path, relative: str, lines: list[str]) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _arc(**changes) -> str:
    return json.dumps({**ARC_ROW, **changes})


def test_loads_rows_in_order_with_row_numbers(tmp_path: Path):
    _write(tmp_path, "arc/ARC-Easy/test.jsonl", [_arc(id="a"), "", _arc(id="b")])
    docs = load_docs("arc_easy", tmp_path)
    assert [d["id"] for d in docs] == ["a", "b"]
    assert [d["_row"] for d in docs] == [0, 1]


def test_invalid_json_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path, "arc/ARC-Easy/test.jsonl", [_arc(), _arc(), '{"id": "broken",'])
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_docs("arc_easy", tmp_path)


def test_line_numbers_count_blank_lines(tmp_path: Path):
    path = _write(tmp_path, "arc/ARC-Easy/test.jsonl", [_arc(), "", "", "[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:4: malformed arc_easy row: expected a JSON object"):
        load_docs("arc_easy", tmp_path)


def test_missing_field_names_file_line_and_field(tmp_path: Path):
    row = dict(ARC_ROW)
    del row["answerKey"]
    path = _write(tmp_path, "arc/ARC-Easy/test.jsonl", [_arc(), json.dumps(row)])
    with pytest.raises(DataError) as info:
        load_docs("arc_easy", tmp_path)
    assert f"{path}:2:" in str(info.value)
    assert "missing field 'answerKey'" in str(info.value)


def test_nested_field_with_wrong_type(tmp_path: Path):
    bad = _arc(choices={"text": "iron", "label": ["A"]})
    path = _write(tmp_path, "arc/ARC-Easy/test.jsonl", [bad])
    with pytest.raises(DataError, match=rf"{path}:1: .*field 'choices.text' should be list\[str\], got str"):
        load_docs("arc_easy", tmp_path)


def test_gold_not_among_choices(tmp_path: Path):
    path = _write(tmp_path, "arc/ARC-Easy/test.jsonl", [_arc(), _arc(answerKey="E")])
    with pytest.raises(DataError, match=rf"{path}:2: .*answerKey"):
        load_docs("arc_easy", tmp_path)


def test_mmlu_answer_out_of_range(tmp_path: Path):
    row = {"question": "q", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 4}
    path = _write(tmp_path, "mmlu/test.jsonl", [json.dumps({**row, "answer": 0}), json.dumps(row)])
    with pytest.raises(DataError, match=rf"{path}:2: .*gold index 4 is outside the 4 choices"):
        load_docs("mmlu", tmp_path)


def test_mmlu_rows_get_their_index_within_the_subject(tmp_path: Path):
    def row(subject: str) -> str:
        return json.dumps({"question": "q", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": 1})

    _write(tmp_path, "mmlu/test.jsonl", [row("anatomy"), row("anatomy"), row("virology"), row("anatomy")])
    task = get_task("mmlu")
    ids = [task.doc_id(d) for d in load_docs(task, tmp_path)]
    assert ids == ["anatomy/0", "anatomy/1", "virology/0", "anatomy/2"]


def test_truthfulqa_needs_a_true_label(tmp_path: Path):
    row = {"question": "q", "mc2_targets": {"choices": ["x", "y"], "labels": [0, 0]}}
    path = _write(tmp_path, "truthfulqa/multiple_choice.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=rf"{path}:1: .*no choice is labelled true"):
        load_docs("truthfulqa_mc2", tmp_path)


def test_hellaswag_bad_label(tmp_path: Path):
    row = {
        "ind": 1,
        "activity_label": "Cooking",
        "ctx_a": "A man cooks.",
        "ctx_b": "he",
        "endings": ["a", "b", "c", "d"],
        "label": "x",
    }
    path = _write(tmp_path, "hellaswag/validation.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match=rf"{path}:1: .*hellaswag preprocessing failed"):
        load_docs("hellaswag", tmp_path)


def test_empty_file(tmp_path: Path):
    path = _write(tmp_path, "gsm8k/test.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"{path} is empty"):
        load_docs("gsm8k", tmp_path)


def test_missing_data_dir_says_how_to_fix(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_docs("gsm8k", tmp_path / "nowhere")
    message = str(info.value)
    assert "does not exist" in message and "--data-dir" in message and "LLMLAB_DATA_DIR" in message


def test_missing_split_file_names_it(tmp_path: Path):
    _write(tmp_path, "gsm8k/test.jsonl", [json.dumps({"question": "q", "answer": "#### 1"})])
    with pytest.raises(DataError) as info:
        load_docs("gsm8k", tmp_path, split="train")
    message = str(info.value)
    assert "gsm8k/train.jsonl" in message and "--data-dir" in message and "LLMLAB_DATA_DIR" in message


def test_files_are_read_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write(tmp_path, "gsm8k/test.jsonl", [json.dumps({"question": "q", "answer": "#### 1"})])
    reads: list[Path] = []
    original = datasets._read_jsonl

    def counting(path: Path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(datasets, "_read_jsonl", counting)
    first = load_docs("gsm8k", tmp_path)
    second = load_docs("gsm8k", tmp_path)
    assert first == second and first is not second
    assert len(reads) == 1


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as info:
        load_docs("arc_easy", None)
    message = str(info.value)
    assert "--data-dir" in message and "datasets" in message


def test_prepare_docs_reports_positions():
    task = get_task("gsm8k")
    with pytest.raises(DataError, match=r"<rows>:2: malformed gsm8k row: missing field 'answer'"):
        prepare_docs(task, [{"question": "q", "answer": "a"}, {"question": "q"}])


@pytest.mark.parametrize(
    ("name", "split", "rows"),
    [
        ("arc_challenge", "test", 1172),
        ("arc_challenge", "train", 1119),
        ("arc_easy", "test", 2376),
        ("hellaswag", "validation", 1000),
        ("mmlu", "test", 14042),
        ("mmlu", "dev", 285),
        ("truthfulqa_mc1", "validation", 817),
        ("truthfulqa_mc2", "validation", 817),
        ("gsm8k", "test", 1319),
        ("gsm8k", "train", 7473),
    ],
)
def test_real_mirror_loads(name: str, split: str, rows: int, data_dir: Path):
    task = get_task(name)
    docs = load_docs(task, data_dir, split=split)
    assert len(docs) == rows
    ids = [task.doc_id(d) for d in docs]
    assert len(set(ids)) == rows  # native ids are unique
