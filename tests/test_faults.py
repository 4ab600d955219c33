"""Faults a long run meets: a full disk while writing results, an xdist worker that dies mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from llmlab_fixtures.reports.results_dir import atomic_write_text

    target = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic_write_text(target, "new results " * 10_000)
    except OSError as exc:
        print(f"write failed: {exc.strerror}")
""")


def test_a_results_write_that_runs_out_of_space_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.csv"
    target.write_text("old results\n")
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(target)], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "write failed: File too large", done.stderr
    assert target.read_text() == "old results\n"  # never half a file
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]  # no temporary left behind


CRASHING_MODULE = """
import os

def test_zz_worker_dies():
    os._exit(17)  # as a segfault or the OOM killer would end a worker
"""


def test_a_crashed_worker_does_not_lose_the_other_results(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    bench_pytester.makepyfile(test_zz_crash=CRASHING_MODULE)
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy or worker_dies", "--models=local:smollm2-135m,local:gemma3-270m", "--limit=2",
        f"--data-dir={data_dir}", f"--output-dir={out}", "-n", "2", "-p", "no:cacheprovider", "--no-checkpoint",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running 'test_zz_crash.py::test_zz_worker_dies'*",
                                 "*llmlab comparison*", "arc_easy*"])
    results = json.loads((out / "results.json").read_text())
    assert sorted(s["model"] for s in results["summary"]) == ["llama-cpp:gemma3-270m", "llama-cpp:smollm2-135m"]
    assert len((out / "items.jsonl").read_text().splitlines()) == 4
