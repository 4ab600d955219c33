"""llama-bench-style speed figures per model: prompt processing (pp512), token generation (tg128) and time to
first token, timed with pytest-benchmark and carried to the controller like the dataset summaries."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llmlab_fixtures.providers.base import GenerationRequest, Provider

SPEED_PROPERTY = "llmlab_speed"
PP_TOKENS = 512
TG_TOKENS = 128
TTFT_PROMPT = ("The history of science is the study of how people came to understand the natural world, "
               "from the earliest records of astronomy and medicine to the experiments and theories of today. ")
ROUNDS = 3
XDIST_SKIP = ("speed figures need the whole machine: pytest-benchmark does not run under pytest-xdist; "
              "run `pytest bench/test_speed.py -p no:xdist` (or -n 0)")
SPEED_TESTS = {"pp512": "tokens/s", "tg128": "tokens/s", "ttft": "s"}


@dataclass
class SpeedFigure:
    """One speed test of one model: the median over ``rounds`` timed runs (after a warm-up)."""

    model: str
    backend: str
    test: str  # pp512, tg128 or ttft
    value: float  # tokens/s for pp512/tg128, seconds for ttft
    unit: str
    median_s: float
    min_s: float
    max_s: float
    rounds: int
    threads: int | None = None
    device: str | None = None
    data_location: str = "in-process"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ttft_once(provider: Provider, counter: list[int]) -> float | None:
    """Time to first token of a fresh ~100-token prompt (a new first word each call: no cache reuse)."""
    counter[0] += 1
    result = provider.generate(GenerationRequest(f"Round {counter[0]}. " + TTFT_PROMPT * 2, (), 1))
    return result.ttft_s


def measure(test: str, provider: Provider, model: str, benchmark: Any, *, rounds: int = ROUNDS) -> SpeedFigure:
    """Run one speed test through pytest-benchmark's ``benchmark.pedantic`` and turn its timings into a figure.

    Raises SpeedProbeUnsupported for tests a backend cannot run (pp/tg on a server or cloud API).
    """
    if test == "pp512":
        provider.time_prompt(8)  # fails fast, before pytest-benchmark, where the backend cannot do this
        benchmark.pedantic(provider.time_prompt, args=(PP_TOKENS,), rounds=rounds, warmup_rounds=1)
        tokens = PP_TOKENS
    elif test == "tg128":
        provider.time_generation(1)
        benchmark.pedantic(provider.time_generation, args=(TG_TOKENS,), rounds=rounds, warmup_rounds=1)
        tokens = TG_TOKENS
    elif test == "ttft":
        counter = [0]
        ttfts: list[float] = []
        benchmark.pedantic(lambda: ttfts.append(_ttft_once(provider, counter) or 0.0), rounds=rounds,
                           warmup_rounds=1)
        tokens = 0
    else:
        raise ValueError(f"unknown speed test {test!r}; choose among {', '.join(SPEED_TESTS)}")
    stats = benchmark.stats.stats
    model_info = provider.get_model_info()
    info = model_info.extra
    if test == "ttft":  # the provider's own first-token time (streamed), not the whole call
        timed = sorted(ttfts[-rounds:])
        median, low, high = timed[len(timed) // 2], timed[0], timed[-1]
        value = median
    else:
        median, low, high = stats.median, stats.min, stats.max
        value = tokens / median
    return SpeedFigure(model=model, backend=provider.backend, test=test, value=value, unit=SPEED_TESTS[test],
                       median_s=median, min_s=low, max_s=high, rounds=rounds,
                       threads=info.get("n_threads") or info.get("threads"), device=info.get("device"),
                       data_location=model_info.data_location)


def speed_property(figure: SpeedFigure) -> tuple[str, str]:
    """The user property that carries a speed figure to the controller."""
    return SPEED_PROPERTY, json.dumps(figure.to_json())


def speeds_from_properties(properties: Iterable[tuple[str, Any]]) -> list[SpeedFigure]:
    return [SpeedFigure(**json.loads(value)) for key, value in properties if key == SPEED_PROPERTY]


def speed_cells(figures: Sequence[SpeedFigure], models: Sequence[str]) -> list[list[str]]:
    """Rows for the comparison table: one per speed test, one cell per model."""
    by_key = {(f.model, f.test): f for f in figures}
    rows = []
    for test, unit in SPEED_TESTS.items():
        if not any(f.test == test for f in figures):
            continue
        cells = [f"{test} ({unit})"]
        for model in models:
            f = by_key.get((model, test))
            cells.append("-" if f is None else f"{f.value:.3f}" if unit == "s" else f"{f.value:.1f}")
        rows.append(cells)
    return rows
