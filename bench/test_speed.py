"""Speed like llama-bench: prompt processing of 512 tokens (pp512), generation of 128 tokens (tg128) and time to
first token, per model, with pytest-benchmark. Runs without xdist only (timings need the whole machine)."""

import pytest


@pytest.mark.llmlab_dataset("speed")
@pytest.mark.parametrize("test", ["pp512", "tg128", "ttft"])
def test_speed(test, measure_speed):
    figure = measure_speed(test)
    assert figure.value > 0, f"{test} measured nothing"
