"""The original `python run_benchmarks.py ...` command lines, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "run_benchmarks.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_old_command_line_runs_truthfulness(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "out"
    done = _run("--model", "smollm2-135m", "--dataset", "truthfulness", "--limit", "3", "--data-dir", str(data_dir),
                "--output-dir", str(out), "--export-format", "markdown", "--include-cost-analysis", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout
    assert "total cost of ownership at 100,000,000 tokens/month" in done.stdout  # --include-cost-analysis
    assert sorted(p.name for p in out.iterdir()) == ["items.jsonl", "summary.md"]
    again = _run("--model", "smollm2-135m", "--dataset", "truthfulness", "--limit", "3", "--data-dir", str(data_dir),
                 "--output-dir", str(tmp_path / "again"), "--export-format", "json", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    summaries = json.loads((tmp_path / "again" / "results.json").read_text())["summary"]
    assert [s["n_resumed"] for s in summaries] == [3, 3]  # the same command resumes from .llmlab/checkpoint.sqlite
    fresh = _run("--model", "smollm2-135m", "--dataset", "truthfulness", "--limit", "3", "--data-dir", str(data_dir),
                 "--output-dir", str(tmp_path / "fresh"), "--export-format", "json", "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0
    assert [s["n_resumed"] for s in json.loads((tmp_path / "fresh" / "results.json").read_text())["summary"]] == [0, 0]
    datasets = {json.loads(line)["dataset"] for line in (out / "items.jsonl").read_text().splitlines()}
    assert datasets == {"truthfulqa_mc1", "truthfulqa_mc2"}
    assert "| dataset (metric) | llama-cpp:smollm2-135m |" in (out / "summary.md").read_text()


def test_unknown_dataset_is_one_line(tmp_path: Path) -> None:
    done = _run("--model", "smollm2-135m", "--dataset", "truthfulnes", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip() == ("run_benchmarks.py: unknown dataset 'truthfulnes' "
                                   "(did you mean truthfulness or truthfulqa?); "
                                   "choose among truthfulness, truthfulqa, arc, gsm8k, mmlu, hellaswag")


def test_unknown_model_is_one_line(tmp_path: Path, data_dir: Path) -> None:
    done = _run("--model", "smolm2", "--dataset", "arc", "--data-dir", str(data_dir), cwd=tmp_path)
    assert done.returncode == 4
    assert done.stderr.strip().startswith("ERROR: unknown model 'smolm2': did you mean smollm2-135m,")
