"""--preset performance|quality|memory and --quantization: the GGUF file a run picks, and what it records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmlab_fixtures.errors import ConfigError, ModelUnavailable
from llmlab_fixtures.models.files import gguf_for_run, resolve_gguf
from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf
from llmlab_fixtures.models.registry import builtin_models
from llmlab_fixtures.run.presets import PRESET_KEYS, merge_with_preset, preset_values, presets

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    model_dirs: tuple[Path, ...] = ()
    quantization: str | None = None
    preferred_quantization: str | None = None


def test_every_preset_sets_every_knob() -> None:
    assert list(presets()) == ["performance", "quality", "memory"]
    for name in presets():
        assert set(preset_values(name)) == set(PRESET_KEYS)
    assert preset_values("Memory")["ctx_size"] == 1024


def test_explicit_options_win_over_the_preset() -> None:
    values, origin = merge_with_preset("performance", {"threads": "3", "quantization": None, "dtype": "float32"})
    assert values["threads"] == "3" and origin["threads"] == "option"
    assert values["dtype"] == "float32" and origin["dtype"] == "option"
    assert values["quantization"] == "Q4_K_M" and origin["quantization"] == "preset"
    assert merge_with_preset(None, {"threads": 2}) == ({"threads": 2}, {"threads": "option"})


def test_an_unknown_preset_names_the_ones_that_exist() -> None:
    with pytest.raises(ConfigError) as info:
        preset_values("fast")
    assert str(info.value) == "--preset must be one of performance, quality, memory, got 'fast'"


def test_quantization_picks_the_matching_file(tmp_path: Path) -> None:
    entry = builtin_models()["smollm-135m"]
    assert entry.gguf_files == {"Q4_K_M": "SmolLM-135M.Q4_K_M.gguf", "Q5_K_M": "SmolLM-135M.Q5_K_M.gguf",
                                "Q8_0": "SmolLM-135M.Q8_0.gguf"}
    (tmp_path / "SmolLM-135M.Q4_K_M.gguf").symlink_to(embedded_gguf(SMOLLM2))
    dirs = (tmp_path,)
    assert resolve_gguf(entry, entry.alias, dirs, quantization="q4_k_m") == tmp_path / "SmolLM-135M.Q4_K_M.gguf"
    with pytest.raises(ModelUnavailable) as info:
        resolve_gguf(entry, entry.alias, dirs)  # the default Q8_0 file is not here
    assert "get it with `llmlab download smollm-135m`" in str(info.value)
    with pytest.raises(ModelUnavailable) as info:
        resolve_gguf(entry, entry.alias, dirs, quantization="Q5_K_M")
    assert str(info.value) == ("model 'smollm-135m' (Q5_K_M) is not available locally; get it with "
                               "`llmlab download smollm-135m --quantization Q5_K_M`")
    with pytest.raises(ModelUnavailable) as info:
        resolve_gguf(entry, entry.alias, dirs, quantization="Q2_K")
    assert str(info.value) == "model 'smollm-135m' has no Q2_K GGUF; available: Q4_K_M, Q5_K_M, Q8_0"


def test_a_preset_quantization_is_a_preference(tmp_path: Path) -> None:
    entry = builtin_models()["smollm-135m"]
    (tmp_path / "SmolLM-135M.Q8_0.gguf").symlink_to(embedded_gguf(SMOLLM2))
    # the preset prefers Q4_K_M, which is not here: the default file runs
    assert gguf_for_run(entry, entry.alias, Settings((tmp_path,), preferred_quantization="Q4_K_M")) == \
        tmp_path / "SmolLM-135M.Q8_0.gguf"
    (tmp_path / "SmolLM-135M.Q4_K_M.gguf").symlink_to(embedded_gguf(SMOLLM2))
    assert gguf_for_run(entry, entry.alias, Settings((tmp_path,), preferred_quantization="Q4_K_M")) == \
        tmp_path / "SmolLM-135M.Q4_K_M.gguf"
    smollm2 = builtin_models()["smollm2-135m"]  # embedded, one file (Q4_1): a preferred Q8_0 leaves it alone
    assert gguf_for_run(smollm2, smollm2.alias, Settings(preferred_quantization="Q8_0")) == embedded_gguf(SMOLLM2)


def test_a_quantization_no_requested_model_has_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_arc=(REPO / "bench" / "test_arc.py").read_text())
    result = pytester.runpytest_subprocess("--models=local:smollm2-135m", "--quantization=Q8_0", "-p",
                                           "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.errlines if line] == [
        "ERROR: model 'smollm2-135m' has no Q8_0 GGUF; available: Q4_1"]
    assert "not yet honoured" not in result.stdout.str() + result.stderr.str()


def test_preset_in_header_and_results(pytester: pytest.Pytester, data_dir: Path) -> None:
    pytester.makepyfile(test_arc=(REPO / "bench" / "test_arc.py").read_text())
    out = pytester.path / "run"
    result = pytester.runpytest_subprocess(
        "--models=local:smollm2-135m", "--preset=quality", "--threads=1", "--limit=1", "-k", "arc_easy",
        f"--data-dir={data_dir}", f"--output-dir={out}", "--no-checkpoint", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)
    line = ("preset quality: ctx-size=8192, batch-size=auto, threads=1 (option), quantization=Q8_0, gpu-layers=auto, "
            "dtype=float32")
    assert f"llmlab: {line}" in result.outlines
    document = json.loads((out / "results.json").read_text())
    config = document["config"]
    assert (config["preset"], config["ctx_size"], config["threads"], config["dtype"]) == ("quality", 8192, 1,
                                                                                         "float32")
    assert (config["quantization"], config["preferred_quantization"], config["gpu_layers"]) == (None, "Q8_0", "auto")
    assert config["preset_origin"]["threads"] == "option" and config["preset_origin"]["ctx_size"] == "preset"
    info = document["models"]["llama-cpp:smollm2-135m"]
    assert info["extra"]["n_ctx"] == 8192
    assert info["quantization"] == "Q4_1"  # the model has no Q8_0 file: its own file ran
    assert info["extra"]["n_gpu_layers"] == (0 if not document["machine"]["gpus"] else info["extra"]["n_gpu_layers"])
