"""GPU detection, --gpu-layers auto, CPU fallback, memory fit, and the load/unload lifecycle of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf, gguf_metadata
from llmlab_fixtures.models.resources import (
    GpuInfo,
    auto_gpu_layers,
    fits,
    free_vram,
    llama_gpu_offload,
    llama_layers_fallback,
    load_with_cpu_fallback,
    offloaded_share,
    system_info,
)

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def test_llmlab_system_shows_what_this_machine_has() -> None:
    out = subprocess.run([sys.executable, "-m", "llmlab_fixtures.cli", "system"], capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    info = system_info(use_torch=True)
    assert out[0].startswith("memory: ") and f"cores: {info['physical_cores']} physical" in out[0]
    offload = {True: "supported", False: "not in this build (CPU only)"}[bool(info["llama_cpp_gpu_offload"])]
    assert out[1] == f"llama.cpp GPU offload: {offload}"
    assert out[2].startswith(f"torch {info['torch']['torch']}: CUDA ")
    if info["gpus"]:
        assert all(line.startswith("GPU ") for line in out[3:])
    else:
        assert out[3] == "GPUs: none found (nvidia-smi, torch, Apple Metal): models run on the CPU"


def test_auto_gpu_layers_fit_free_vram() -> None:
    meta = gguf_metadata(embedded_gguf(SMOLLM2))  # 30 layers, 94 MiB
    assert meta["block_count"] == 30
    per_layer = meta["file_size"] / 31
    assert auto_gpu_layers(meta, None, True) == 0  # no GPU
    assert auto_gpu_layers(meta, 8 << 30, False) == 0  # a build without offload
    assert auto_gpu_layers(meta, 8 << 30, True) == -1  # everything fits
    assert auto_gpu_layers(meta, 512 * MiB + int(10.5 * per_layer), True) == 10
    assert auto_gpu_layers(meta, 256 * MiB, True) == 0  # less than the reserve


def test_free_vram_is_the_emptiest_gpu() -> None:
    gpus = [GpuInfo(0, "a", "cuda", "nvidia-smi", 8 << 30, 1 << 30), GpuInfo(1, "b", "cuda", "nvidia-smi",
                                                                         8 << 30, 3 << 30)]
    assert free_vram(gpus) == 3 << 30
    assert free_vram([]) is None


def test_memory_fit_names_ram_or_vram() -> None:
    assert fits(100 * MiB, 200 * MiB) is None
    assert fits(300 * MiB, 200 * MiB, ram_source="--max-memory") == (
        "needs about 300 MiB but --max-memory is 200 MiB; choose a smaller model or quantization, free memory, "
        "or raise --max-memory")
    assert fits(10 * MiB, 200 * MiB, 900 * MiB, 500 * MiB) == (
        "needs about 900 MiB of GPU memory but 500 MiB is free; lower --gpu-layers (or use auto) or free GPU memory")
    assert fits(10 * MiB, 200 * MiB, 400 * MiB, 500 * MiB) is None


def test_offloaded_share() -> None:
    meta = {"block_count": 30}
    assert offloaded_share(meta, 0) == 0.0
    assert offloaded_share(meta, -1) == 1.0
    assert offloaded_share(meta, 15) == pytest.approx(15 / 31)


def test_a_failed_gpu_load_is_retried_on_the_cpu() -> None:
    calls: list[int] = []

    def load(layers: int) -> object | None:
        calls.append(layers)
        return None if layers else "model"

    assert load_with_cpu_fallback(load, 12) == ("model", 0, "offloading 12 layers failed (the GPU load failed); "
                                                              "loaded on the CPU instead")
    assert calls == [12, 0]

    def broken(layers: int) -> object:
        if layers:
            raise RuntimeError("CUDA driver version is insufficient")
        return "model"

    assert load_with_cpu_fallback(broken, -1)[1:] == (0, "offloading -1 layers failed (CUDA driver version is "
                                                         "insufficient); loaded on the CPU instead")
    assert load_with_cpu_fallback(lambda layers: "gpu-model", 5) == ("gpu-model", 5, None)


def test_llama_offload_request_without_offload_support_falls_back() -> None:
    if llama_gpu_offload():
        pytest.skip("this llama-cpp-python build offloads to a GPU")
    layers, notice = llama_layers_fallback(20)
    assert layers == 0
    assert notice == ("--gpu-layers 20: this llama-cpp-python build has no GPU offload "
                      "(llama_supports_gpu_offload() is false); llama.cpp runs on the CPU")
    assert llama_layers_fallback(None) == (None, None)  # auto decides by itself


def test_system_info_loads_torch_before_llama_cpp(tmp_path: Path) -> None:
    """``llmlab system`` on a box whose nvidia-smi answers (here a script printing what an H200's printed): torch is
    imported before llama_cpp (a CUDA llama.cpp build imported first made importing torch abort the process there)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H200, 143771, 143000'\n")
    smi.chmod(0o755)
    code = ("import sys; from llmlab_fixtures.models.resources import system_info; info = system_info(use_torch=True); "
            "loaded = list(sys.modules); print(info['gpus'][0]['name'].split()[-1], "
            "loaded.index('torch') < loaded.index('llama_cpp'))")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["H200", "True"]


def test_transformers_on_cuda_without_cuda_falls_back_with_one_notice(pytester: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pytester.makepyfile(test_nothing="def test_nothing(): pass")
    result = pytester.runpytest_subprocess("--models=transformers:smollm2-135m", "--device=cuda", "-p",
                                           "no:cacheprovider", "--collect-only")
    notice = (f"--device cuda asks for CUDA, but torch {torch.__version__} sees no CUDA GPU; install a CUDA build "
              "of torch (see README) or use --device cpu: falling back to the CPU")
    assert [line for line in result.outlines if "falling back" in line] == [f"llmlab: {notice}", f"note: {notice}"]


def test_two_models_load_one_at_a_time_and_release_memory(pytester: pytest.Pytester, data_dir: Path) -> None:
    """A single-process run of two models loads the first, runs its tests, closes it, then loads the second;
    model_loads records RSS before/after load and after close; offload on a CPU-only build falls back."""
    pytester.makepyfile(test_arc=(REPO / "bench" / "test_arc.py").read_text())
    out = pytester.path / "run"
    result = pytester.runpytest_subprocess(
        "--models=local:smollm2-135m,local:gemma3-270m", "--limit=1", f"--data-dir={data_dir}", "--threads=1",
        f"--output-dir={out}", "--gpu-layers=8", "--no-checkpoint", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=4)
    document = json.loads((out / "results.json").read_text())
    smollm, gemma = document["config"]["models"]
    ran = [line.split("[", 1)[1] for line in result.outlines if "::test_arc[" in line and "PASSED" in line]
    assert [smollm in r for r in ran] == [True, True, False, False] and all(gemma in r for r in ran[2:])
    loads = document["model_loads"]
    assert [len(loads[m]) for m in (smollm, gemma)] == [1, 1]
    first, second = loads[smollm][0], loads[gemma][0]
    assert first["unloaded_at"] <= second["loaded_at"]  # closed before the next model was loaded
    for load in (first, second):
        assert load["rss_before_load"] < load["rss_after_load"]
        assert load["rss_released"] == load["rss_after_load"] - load["rss_after_close"]
    assert first["rss_released"] > 0  # unmapping the weights gave memory back
    assert "gpus" in document["machine"] and "llama_cpp_gpu_offload" in document["machine"]
    if document["machine"]["llama_cpp_gpu_offload"] is False:
        notice = ("--gpu-layers 8: this llama-cpp-python build has no GPU offload "
                  "(llama_supports_gpu_offload() is false); llama.cpp runs on the CPU")
        assert f"llmlab: {notice}" in result.outlines
        assert document["config"]["gpu_layers"] == 0 and notice in document["config"]["notices"]
        assert document["models"][smollm]["extra"]["n_gpu_layers"] == 0
