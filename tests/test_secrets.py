"""API keys never leave the environment: not in results, checkpoints, logs, reports or error messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.testing.anthropic_server import running_anthropic_server
from llmlab_fixtures.testing.google_server import running_google_server
from llmlab_fixtures.testing.loopback import load_backing

pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

KEYS = {
    "OPENAI_API_KEY": "sk-proj-SECRETopenai0123456789",
    "ANTHROPIC_API_KEY": "sk-ant-SECRETanthropic0123456789",  # the server wants another key: every item fails
    "GOOGLE_API_KEY": "AIzaSECRETgoogle0123456789",
    "LLMLAB_OPENAI_COMPAT_API_KEY": "SECRETcompat0123456789",
}


@pytest.fixture
def servers() -> Iterator[tuple[str, str]]:
    backing = load_backing(None)
    with running_anthropic_server(api_key="the-only-accepted-key", backing=backing) as anthropic, \
            running_google_server(api_key=KEYS["GOOGLE_API_KEY"], backing=backing) as google:
        yield anthropic.base_url, google.base_url


def test_fake_keys_appear_in_no_output(bench_pytester: pytest.Pytester, data_dir: Path, servers: tuple[str, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    anthropic_url, google_url = servers
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_url)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", google_url)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens: every request fails
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", "--models=claude-3-haiku,gemini-1.5-flash,gpt-4o-mini", "--limit=2", "--max-retries=0",
        "--request-timeout=5", f"--data-dir={data_dir}", f"--output-dir={out}", "--html=report.html",
        "--self-contained-html", "--junitxml=junit.xml", "-o", "log_level=DEBUG", "-o", "log_cli=true",
        "-p", "no:cacheprovider", "-rA", "--debug=debug.log",
    )
    result.assert_outcomes(passed=1, failed=2, deselected=18)  # every Claude and GPT item failed: errors, not zeros
    result.stdout.fnmatch_lines(["arc_easy (acc)*2 errors*0.* ± *2 errors*"])
    items = (bench_pytester.path / "run" / "items.jsonl").read_text()
    assert "the API rejected the key in ANTHROPIC_API_KEY" in items  # the variable, never the value
    texts = {"stdout": result.stdout.str(), "stderr": result.stderr.str()}
    files = [p for p in bench_pytester.path.rglob("*") if p.is_file() and p.suffix != ".py"]
    assert {p.name for p in files} >= {"items.jsonl", "results.json", "summary.csv", "summary.md", "report.html",
                                       "junit.xml", "debug.log", "checkpoint.sqlite"}
    texts.update({str(p): p.read_bytes().decode("utf-8", errors="replace") for p in files})
    for name, value in KEYS.items():
        leaks = [where for where, text in texts.items() if value in text or value[:16] in text]
        assert not leaks, f"{name} leaked into {leaks}"
