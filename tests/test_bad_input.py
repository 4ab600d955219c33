"""Bad input a user can give, each answered by one exact line that names the fix (through pytest, as users run it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: embedded_gguf(SMOLLM2).read_bytes()[:5000], "header ends early (file truncated)"),
        (lambda: b"not a gguf at all", "file is only 17 bytes"),
        (lambda: b"GGUF" + bytes(4096), "unsupported GGUF version 0"),
    ],
    ids=["truncated", "tiny", "bad-version"],
)
def test_a_broken_gguf_is_refused_before_loading(pytester: pytest.Pytester, content, reason: str) -> None:
    path = pytester.path / "model.gguf"
    path.write_bytes(content())
    result = pytester.runpytest_subprocess(f"--models=llama-cpp:{path}", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    expected = f"ERROR: {path} is not a usable GGUF model: {reason}; re-download or reinstall it"
    assert result.stderr.str().strip() == expected


def _gsm8k_mirror(root: Path, data_dir: Path, test_rows: str) -> Path:
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text(test_rows)
    (root / "gsm8k" / "train.jsonl").write_text((data_dir / "gsm8k" / "train.jsonl").read_text())
    return root


@pytest.mark.parametrize(
    ("rows", "line"),
    [
        ("\n  \n", "{file} is empty; re-copy the dataset mirror (pass --data-dir or set LLMLAB_DATA_DIR to the local "
                   "mirror (laid out as <dataset>/<split>.jsonl))"),
        ('{"question": "How many?"}\n', "{file}:1: malformed gsm8k row: missing field 'answer'"),
    ],
    ids=["empty", "wrong-schema"],
)
def test_a_bad_dataset_file_fails_its_test_with_one_line(bench_pytester: pytest.Pytester, data_dir: Path,
                                                          rows: str, line: str) -> None:
    mirror = _gsm8k_mirror(bench_pytester.path / "data", data_dir, rows)
    result = bench_pytester.runpytest_subprocess(
        "-k", "gsm8k", f"--data-dir={mirror}", "--no-checkpoint", "-p", "no:cacheprovider",
        f"--output-dir={bench_pytester.path / 'run'}",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    expected = line.format(file=mirror / "gsm8k" / "test.jsonl")
    assert expected in result.stdout.lines
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--preset=fast"], "ERROR: --preset must be one of performance, quality, memory, got 'fast'"),
        (["--gpu-layers=most"], "ERROR: --gpu-layers must be a whole number >= -1 or auto, got 'most'"),
        (["--dtype=int8"], "ERROR: --dtype must be one of auto, float32, float16, bfloat16, got 'int8'"),
        (["--ctx-size=8"], "ERROR: --ctx-size must be at least 16, got 8"),
        (["--quantization=Q3_K_S"], "ERROR: model 'smollm2-135m' has no Q3_K_S GGUF; available: Q4_1"),
    ],
    ids=["preset", "gpu-layers", "dtype", "ctx-size", "quantization"],
)
def test_a_bad_resource_option_is_one_line(pytester: pytest.Pytester, args: list[str], line: str) -> None:
    result = pytester.runpytest_subprocess("--models=local:smollm2-135m", *args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.str().strip() == line
