"""Render an HTML report in headless Chromium and save a PNG screenshot of it.

    python benchmarks/screenshot_report.py .llmlab/runs/<timestamp>/report.html report.png

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``). No network, no profile of yours: a
throwaway user-data directory and every background service switched off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def screenshot(html: Path, png: Path, *, width: int = 1400, height: int = 2400, timeout: float = 120.0) -> Path:
    """Load ``html`` in headless Chromium and write a ``width`` × ``height`` PNG; RuntimeError if none is written."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("chromium not found; install it (Debian: apt-get install -y chromium)")
    png = png.resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmlab-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                   html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the HTML file (report.html, or a pytest-html report)")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"screenshot_report: {args.html} does not exist; give the path of an HTML report", file=sys.stderr)
        return 2
    try:
        print(screenshot(args.html, args.png, width=args.width, height=args.height))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
