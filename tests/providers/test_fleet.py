"""One model served by several servers (a fleet): one label, requests spread over the servers, and a server that
dies mid-run taken out of rotation while its requests go to the others; every item scored exactly once."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models, load_models
from llmlab_fixtures.models.specs import parse_specs
from llmlab_fixtures.providers import prompt_logprobs
from llmlab_fixtures.testing.vllm_server import VllmState, running_vllm_server

LABEL = "openai-compat:smollm2"
LIMIT = 12


@pytest.fixture
def servers() -> Iterator[tuple[VllmState, VllmState]]:
    with running_vllm_server(embedded_gguf(SMOLLM2), "smollm2") as a, \
            running_vllm_server(embedded_gguf(SMOLLM2), "smollm2") as b:
        yield a, b


def _served(state: VllmState) -> list[str]:
    """The benchmark prompts a server answered (the log-likelihood probe left out)."""
    return [p for p in state.prompts if p != prompt_logprobs.probe_prompt()]


def _run(bench_pytester: pytest.Pytester, data_dir: Path, a: VllmState, b: VllmState, *extra: str
         ) -> tuple[pytest.RunResult, list[dict], dict]:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", f"--models=openai-compat:{a.url}#smollm2,openai-compat:{b.url}#smollm2",
        f"--limit={LIMIT}", "--concurrency=2", f"--data-dir={data_dir}", f"--output-dir={out}", "-p",
        "no:cacheprovider", "--no-checkpoint", *extra)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    return result, items, json.loads((out / "results.json").read_text())


def test_the_same_model_at_several_urls_is_one_fleet(tmp_path: Path) -> None:
    spec, = parse_specs("openai-compat:http://127.0.0.1:8001/v1#m,openai-compat:http://127.0.0.1:8002/v1#m",
                        builtin_models())
    assert (spec.label, spec.urls, spec.is_local) == ("openai-compat:m", ("http://127.0.0.1:8001/v1",
                                                                          "http://127.0.0.1:8002/v1"), True)
    toml = tmp_path / "llmlab.toml"
    toml.write_text('[models.big]\nopenai-compat = {base_url = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"],'
                    ' model = "llama-8b"}\n')
    spec, = parse_specs("big", load_models((toml,)))
    assert (spec.label, spec.target, len(spec.urls), spec.is_local) == ("openai-compat:big", "llama-8b", 2, False)


def test_requests_are_spread_and_each_item_is_scored_once(bench_pytester: pytest.Pytester, data_dir: Path,
                                                          servers: tuple[VllmState, VllmState]) -> None:
    a, b = servers
    result, items, results = _run(bench_pytester, data_dir, a, b)
    result.assert_outcomes(passed=1)
    assert [i["model"] for i in items] == [LABEL] * LIMIT and len({i["item_id"] for i in items}) == LIMIT
    assert all(i["error"] is None for i in items)
    served = Counter(_served(a) + _served(b))
    assert set(served.values()) == {1}  # no choice was asked twice
    assert sum(served.values()) == sum(len(i["loglikelihoods"]) for i in items)
    assert len(_served(a)) >= 5 and len(_served(b)) >= 5, (len(_served(a)), len(_served(b)))
    info = results["models"][LABEL]
    assert len(info["extra"]["fleet"]) == 2 and info["data_location"].startswith("loopback 127.0.0.1:")


def test_a_server_that_dies_mid_run_loses_nothing(bench_pytester: pytest.Pytester, data_dir: Path,
                                                  servers: tuple[VllmState, VllmState]) -> None:
    a, b = servers
    b.stop_after = 1 + 6  # the log-likelihood probe, then six benchmark prompts: it dies answering the sixth
    result, items, _ = _run(bench_pytester, data_dir, a, b, "--max-retries=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*{LABEL}: {b.url} taken out of rotation*"])
    assert len({i["item_id"] for i in items}) == LIMIT == len(items)
    assert all(i["error"] is None for i in items), [i["error"] for i in items if i["error"]]
    assert len(_served(b)) >= 6  # a second request in flight when it died went unanswered too
    # every choice was answered once: by the dying server before its sixth prompt, or by the other
    answered = Counter(_served(a) + _served(b)[:5])
    assert sum(answered.values()) == sum(len(i["loglikelihoods"]) for i in items)
    assert set(answered.values()) == {1}
