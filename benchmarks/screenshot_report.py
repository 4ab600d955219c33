"""Render an HTML report in headless Chromium and save a PNG screenshot of it.

    python benchmarks/screenshot_report.py .llmlab/runs/<timestamp>/report.html report.png

Needs the ``chromium`` binary (Debian: ``apt-get install -y chromium``). No network, no profile of yours: a
throwaway user-data directory and every background service switched off.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from llmlab_fixtures.testing.browser import screenshot


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
