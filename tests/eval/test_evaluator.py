"""The evaluator's ordered, bounded-concurrency item loop."""

from __future__ import annotations

import random
import threading
import time

import pytest

from llmlab_fixtures.eval.evaluator import _in_order


@pytest.mark.parametrize("concurrency", [1, 2, 5])
def test_results_keep_job_order_whatever_finishes_first(concurrency: int) -> None:
    delays = [random.Random(7).uniform(0, 0.01) for _ in range(40)]

    def slow_square(i: int) -> int:
        time.sleep(delays[i])
        return i * i

    assert list(_in_order(slow_square, range(40), concurrency)) == [i * i for i in range(40)]


def test_in_flight_calls_are_bounded() -> None:
    lock = threading.Lock()
    running = peak = 0

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)
        with lock:
            running -= 1
        return i

    consumed = list(_in_order(work, iter(range(30)), 3))
    assert consumed == list(range(30)) and 1 < peak <= 3


def test_an_exception_stops_the_loop_and_cancels_what_is_queued() -> None:
    started: list[int] = []

    def fail_at_three(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("boom")
        time.sleep(0.01)
        return i

    with pytest.raises(ValueError, match="boom"):
        list(_in_order(fail_at_three, range(1000), 2))
    assert len(started) < 20  # look-ahead is bounded, the rest never ran
