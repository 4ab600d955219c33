"""How llama_streams groups streams into calls (plan_runs) and splits long jobs (plan_chunks): pure functions."""

from __future__ import annotations

from llmlab_fixtures.providers.llama_cpp.streams import plan_chunks, plan_runs

LIMITS = {"min_tokens": 8, "max_tokens": 512, "max_rows": 64, "call_cost": 4}


def test_similar_jobs_share_one_call_padded_to_the_longest() -> None:
    assert plan_runs([5, 6, 5, 7], [60] * 4, [5, 6, 5, 7], **LIMITS) == [(0, 4, 7)]


def test_a_long_job_runs_alone_rather_than_pad_the_others() -> None:
    # padding three 5-token jobs to 50 costs far more than two more calls
    assert plan_runs([50, 5, 5, 5], [80] * 4, [1] * 4, **LIMITS) == [(0, 1, 50), (1, 4, 5)]


def test_a_stream_alone_decodes_at_least_min_tokens_where_its_input_allows() -> None:
    assert plan_runs([3], [40], [3], **LIMITS) == [(0, 1, 8)]
    assert plan_runs([3], [5], [3], **LIMITS) == [(0, 1, 5)]


def test_a_stream_that_needs_nothing_alone_gets_no_call() -> None:
    # its rows were all read while an earlier choice decoded them
    assert plan_runs([0], [40], [0], **LIMITS) == [(0, 1, 0)]
    assert plan_runs([12, 0, 30], [40, 40, 40], [3, 0, 9], **LIMITS) == [(0, 1, 12), (1, 2, 0), (2, 3, 30)]


def test_a_shared_call_reaches_min_tokens_in_all_and_two_each() -> None:
    assert plan_runs([1, 1], [40, 40], [1, 1], **LIMITS) == [(0, 2, 4)]
    # eight streams make eight tokens with one each, but a stream needs two for the same kernels as alone
    assert plan_runs([1] * 8, [40] * 8, [1] * 8, **LIMITS) == [(0, 8, 2)]


def test_streams_that_cannot_pad_or_exceed_the_limits_do_not_share() -> None:
    # stream 1's whole input is 6 tokens: it cannot decode 9
    assert plan_runs([9, 6], [40, 6], [1, 1], **LIMITS) == [(0, 1, 9), (1, 2, 6)]
    # 40 logits rows each: together over the 64-row limit
    assert plan_runs([40, 40], [90, 90], [40, 40], **LIMITS) == [(0, 1, 40), (1, 2, 40)]
    # 300 tokens each: together over the 512-token batch
    assert plan_runs([300, 300], [900, 900], [1, 1], **LIMITS) == [(0, 1, 300), (1, 2, 300)]


def test_long_jobs_split_by_batch_and_rows_and_the_last_call_is_lengthened() -> None:
    chunks = plan_chunks(0, 1030, set(), n_batch=512, n_outputs_max=64, min_decode=8)
    assert chunks == [(0, 512), (512, 1022), (1022, 1030)]
    rows = plan_chunks(100, 100, set(range(100, 200)), n_batch=512, n_outputs_max=64, min_decode=8)
    assert rows == [(0, 64), (64, 100)]
