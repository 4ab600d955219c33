"""A 10,000+-item run through the real pytest command: memory stays flat, items stream to disk, progress shows an ETA.

Runs ``pytest bench -k <dataset> --models=<model>`` (full MMLU is 14,042 questions) in a subprocess and, every
``--every`` seconds, samples that process's resident memory (VmRSS from /proc) and the items already in its part
file. Prints one line per sample, the last progress line pytest showed, and the memory growth per 1,000 items
after the first sample (model and data loaded).

    python benchmarks/scale_run.py --model local:smollm2-135m --dataset mmlu --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, default_data_dir


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def lines_in(path: Path) -> int:
    """Lines of a JSONL file (one item each)."""
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def items_written(output_dir: Path) -> int:
    """Item lines already streamed to the run's part files."""
    return sum(lines_in(part) for part in output_dir.glob("parts/*/*.jsonl"))


def last_progress(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[llmlab]")]
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="local:smollm2-135m")
    parser.add_argument("--dataset", default="mmlu")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--limit", type=int, default=None, help="items (default: the whole dataset)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest options, after --")
    args = parser.parse_args()
    output_dir = Path(tempfile.mkdtemp(prefix="llmlab-scale-"))
    log = output_dir / "pytest.log"
    command = [sys.executable, "-m", "pytest", "bench", "-k", args.dataset, f"--models={args.model}",
               f"--data-dir={args.data_dir}", f"--output-dir={output_dir}", "--no-checkpoint",
               *([f"--limit={args.limit}"] if args.limit else []), *args.pytest_args]
    print(" ".join(command), flush=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    samples: list[tuple[float, int, float]] = []
    print(f"{'elapsed s':>9} {'items':>7} {'RSS MB':>8}  progress", flush=True)
    while process.poll() is None:
        time.sleep(args.every)
        memory = rss_mb(process.pid)
        if memory is None:
            break
        sample = (time.perf_counter() - started, items_written(output_dir), memory)
        samples.append(sample)
        print(f"{sample[0]:9.0f} {sample[1]:7d} {sample[2]:8.1f}  {last_progress(log)}", flush=True)
    code = process.wait()
    merged = output_dir / "items.jsonl"  # the part files are merged into it when the run ends
    where = (f"{lines_in(merged)} items in {merged}" if merged.exists()
             else f"{items_written(output_dir)} items in {output_dir}/parts")
    print(f"pytest exited {code} after {time.perf_counter() - started:.0f} s; {where}; log {log}")
    usable = [s for s in samples if s[1] > 0]
    if len(usable) >= 2:
        peak = max(s[2] for s in usable)
        print(f"{growth_line(usable[0], usable[-1])} (peak {peak:.1f} MB)")
        settled = [s for s in usable if s[1] >= usable[-1][1] // 4]  # after warm-up: allocator pools, lazy imports
        if len(settled) >= 2 and settled[0] is not usable[0]:
            print(f"from a quarter of the items on: {growth_line(settled[0], settled[-1])}")
    sys.exit(code)


def growth_line(first: tuple[float, int, float], last: tuple[float, int, float]) -> str:
    """Resident memory between two samples and its growth per 1,000 items."""
    (_, n0, m0), (_, n1, m1) = first, last
    growth = (m1 - m0) / (n1 - n0) * 1000 if n1 > n0 else float("nan")
    return f"RSS {m0:.1f} MB at {n0} items -> {m1:.1f} MB at {n1} items: {growth:+.2f} MB per 1,000 items"


if __name__ == "__main__":
    main()
