"""The HTML reports: report.html and the pytest-html summary render in a real headless Chromium with their plots;
the plugin works without pytest-html."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmlab_fixtures.testing.browser import find_chromium, screenshot

REPO = Path(__file__).resolve().parents[2]

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="chromium is not installed (apt-get install -y chromium)")


def _run(bench_pytester: pytest.Pytester, data_dir: Path, *extra: str) -> Path:
    out = bench_pytester.path / "run"
    result = bench_pytester.runpytest_subprocess(
        "-k", "arc_easy", "--models=local:smollm2-135m,local:gemma3-270m", "--limit=3", f"--data-dir={data_dir}",
        f"--output-dir={out}", "-p", "no:cacheprovider", "--no-checkpoint", *extra)
    result.assert_outcomes(passed=2)
    return out


def _distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@needs_chromium
def test_reports_render_in_headless_chromium(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    pytest.importorskip("pytest_html")
    html = bench_pytester.path / "pytest-report.html"
    out = _run(bench_pytester, data_dir, f"--html={html}", "--self-contained-html")
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 3 and "Accuracy vs cost" in page and "Latency distribution" in page
    pytest_page = html.read_text()
    assert "Cost, speed and accuracy" in pytest_page and pytest_page.count("<svg") >= 3
    for source in (out / "report.html", html):
        png = screenshot(source, bench_pytester.path / f"{source.stem}.png")
        from PIL import Image

        with Image.open(png) as image:
            assert image.size == (1400, 2400)
        # a rendered page with tables and coloured plots, not a blank or error page
        assert _distinct_colours(png) > 50


def test_the_plugin_works_without_pytest_html(bench_pytester: pytest.Pytester, data_dir: Path) -> None:
    out = _run(bench_pytester, data_dir, "-p", "no:html")
    assert (out / "report.html").is_file()
    assert "Cost, speed and accuracy" in (out / "summary.md").read_text()


def test_screenshot_script_says_what_is_missing(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "screenshot_report.py"),
                           str(tmp_path / "missing.html"), str(tmp_path / "x.png")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"screenshot_report: {tmp_path / 'missing.html'} does not exist; "
                                   "give the path of an HTML report")
