"""What this machine offers a model: GPUs (CUDA, ROCm, Apple Metal), llama.cpp's GPU offload, RAM and cores;
``--gpu-layers auto``; CPU fallback when a GPU was asked for but cannot be used; registry memory estimates."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

_NVIDIA_SMI_TIMEOUT = 10
_VRAM_RESERVE = 512 << 20  # left free on the GPU for the driver, the CUDA context and other processes
_DEFAULT_CTX = 4096


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator; memory figures are bytes (None where the source does not say)."""

    index: int
    name: str
    kind: str  # cuda, rocm or metal
    source: str  # nvidia-smi, torch or platform
    total_bytes: int | None = None
    free_bytes: int | None = None


def _nvidia_smi() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4 and fields[0].isdigit():
            total = int(float(fields[2]) * 2**20) if fields[2].replace(".", "").isdigit() else None
            free = int(float(fields[3]) * 2**20) if fields[3].replace(".", "").isdigit() else None
            gpus.append(GpuInfo(int(fields[0]), fields[1], "cuda", "nvidia-smi", total, free))
    return gpus


def _torch_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    gpus = []
    for i in range(torch.cuda.device_count()):
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free = total = None
        gpus.append(GpuInfo(i, torch.cuda.get_device_name(i), kind, "torch", total, free))
    return gpus


def _metal() -> list[GpuInfo]:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        import psutil

        # unified memory: the GPU may use most of RAM
        return [GpuInfo(0, f"Apple {platform.processor() or 'Silicon'} GPU", "metal", "platform",
                        int(psutil.virtual_memory().total), int(psutil.virtual_memory().available))]
    return []


def detect_gpus(*, use_torch: bool | None = None) -> list[GpuInfo]:
    """GPUs seen by nvidia-smi, else by torch (CUDA or ROCm), else Apple Metal.

    ``use_torch``: None imports torch only if this process already did (importing it costs seconds).
    """
    if gpus := _nvidia_smi():
        return gpus
    if use_torch is None:
        use_torch = "torch" in sys.modules
    if use_torch and importlib.util.find_spec("torch") is not None and (gpus := _torch_gpus()):
        return gpus
    return _metal()


def llama_gpu_offload() -> bool | None:
    """Whether this llama-cpp-python build can offload layers to a GPU (None: llama-cpp-python missing)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return bool(llama_cpp.llama_supports_gpu_offload())


def torch_accelerators() -> dict[str, Any] | None:
    """What torch sees (None when torch is not installed): CUDA/ROCm version and devices, MPS."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    mps = getattr(torch.backends, "mps", None)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "cuda_available": bool(torch.cuda.is_available()),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "mps_available": bool(mps is not None and mps.is_available())}


def system_info(*, use_torch: bool | None = None) -> dict[str, Any]:
    """GPUs, offload support and memory, as ``llmlab system`` shows and results.json records."""
    import psutil

    vm = psutil.virtual_memory()
    with_torch = use_torch or (use_torch is None and "torch" in sys.modules)
    # torch before llama_cpp: with a CUDA build of llama-cpp-python imported first, importing torch aborted the
    # process ("free(): invalid pointer"; torch 2.11+cu130 with its own CUDA libraries, on an H200)
    accelerators = torch_accelerators() if with_torch else None
    info: dict[str, Any] = {
        "gpus": [asdict(g) for g in detect_gpus(use_torch=use_torch)],
        "llama_cpp_gpu_offload": llama_gpu_offload(),
        "memory_total": int(vm.total),
        "memory_available": int(vm.available),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
    }
    if with_torch:
        info["torch"] = accelerators
    return info


def free_vram(gpus: list[GpuInfo] | None = None) -> int | None:
    """Free memory of the emptiest GPU (bytes), or None without a GPU that reports it."""
    gpus = detect_gpus() if gpus is None else gpus
    free = [g.free_bytes for g in gpus if g.free_bytes is not None]
    return max(free) if free else None


# --- GPU layers and CPU fallback ------------------------------------------------------------------


def auto_gpu_layers(meta: dict[str, Any], vram_free: int | None, offload: bool | None,
                    kv_bytes: int = 0) -> int:
    """Layers of a GGUF to offload so weights (plus the KV cache share) fit in free VRAM; 0 without a usable GPU.

    ``meta`` is embedded.gguf_metadata(): file_size and block_count (layer count) are used.
    """
    if not offload or not vram_free:
        return 0
    n_layers = int(meta.get("block_count") or 0)
    size = int(meta.get("file_size") or 0)
    if n_layers <= 0 or size <= 0:
        return 0
    per_layer = (size + kv_bytes) / (n_layers + 1)  # the output layer counts as one more
    budget = vram_free - _VRAM_RESERVE
    if budget <= 0:
        return 0
    layers = int(budget // per_layer)
    return -1 if layers > n_layers else layers


def llama_layers_fallback(requested: int | None) -> tuple[int | None, str | None]:
    """CPU fallback for llama.cpp: offload asked of a build without GPU support -> (0, notice); else unchanged."""
    if requested == 0 or requested is None:
        return requested, None
    offload = llama_gpu_offload()
    if offload is False:
        return 0, (f"--gpu-layers {requested}: this llama-cpp-python build has no GPU offload "
                   "(llama_supports_gpu_offload() is false); llama.cpp runs on the CPU")
    return requested, None


def torch_device_fallback(device: str) -> tuple[str, str | None]:
    """CPU fallback for transformers: a CUDA/MPS device that this torch cannot use -> ("cpu", notice)."""
    if device in ("auto", "cpu") or importlib.util.find_spec("torch") is None:
        return device, None
    from llmlab_fixtures.errors import ModelUnavailable
    from llmlab_fixtures.models.torch_device import resolve_device

    try:
        resolve_device(device)
    except ModelUnavailable as exc:
        return "cpu", f"{exc}: falling back to the CPU"
    return device, None


def load_with_cpu_fallback(load: Any, n_gpu_layers: int) -> tuple[Any, int, str | None]:
    """Call ``load(n_gpu_layers)``; if GPU initialisation fails (a null/raising load) retry on the CPU (0 layers).

    Returns (model, layers used, notice or None).
    """
    if n_gpu_layers == 0:
        return load(0), 0, None
    try:
        model = load(n_gpu_layers)
    except Exception as exc:  # a GPU backend that fails to initialise
        reason = str(exc) or type(exc).__name__
    else:
        if model:
            return model, n_gpu_layers, None
        reason = "the GPU load failed"
    model = load(0)
    return model, 0, f"offloading {n_gpu_layers} layers failed ({reason}); loaded on the CPU instead"


# --- memory estimates -----------------------------------------------------------------------------


def entry_weights_size(entry: Any) -> int | None:
    """Bytes of a registry model's weights: its GGUF size, else parameters x 2 (F16/BF16) or 4 bytes."""
    if entry.file_size:
        return int(entry.file_size)
    if entry.parameters:
        return int(entry.parameters) * (2 if (entry.quantization or "").upper() in ("F16", "BF16") else 4)
    return None


def entry_memory_estimate(entry: Any, n_ctx: int = _DEFAULT_CTX) -> int | None:
    """Rough bytes a registry model needs before its file is here: its weights plus a KV cache and buffers.

    Used by ``llmlab models`` for downloadable models; loaded files use the backend's exact estimate_memory().
    """
    params = entry.parameters
    weights = entry_weights_size(entry)
    if weights is None:
        return None
    kv = int(params * 0.02 * n_ctx / 1024) if params else 0  # ~2% of the parameters per 1k tokens of f16 KV
    return weights + kv + (64 << 20)


def fits(needed_ram: int, ram_limit: int, needed_vram: int = 0, vram_free: int | None = None,
         ram_source: str = "available memory") -> str | None:
    """Why a model does not fit (one line), or None when it does."""
    from llmlab_fixtures.reports.table import format_size

    if needed_vram and vram_free is not None and needed_vram > vram_free:
        return (f"needs about {format_size(needed_vram)} of GPU memory but {format_size(vram_free)} is free; "
                "lower --gpu-layers (or use auto) or free GPU memory")
    if needed_ram > ram_limit:
        return (f"needs about {format_size(needed_ram)} but {ram_source} is {format_size(ram_limit)}; "
                "choose a smaller model or quantization, free memory, or raise --max-memory")
    return None


def offloaded_share(meta: dict[str, Any], n_gpu_layers: int) -> float:
    """Fraction of a GGUF's layers on the GPU for ``n_gpu_layers`` (-1: all)."""
    n_layers = int(meta.get("block_count") or 0)
    if n_gpu_layers == 0 or n_layers <= 0:
        return 0.0
    if n_gpu_layers < 0 or n_gpu_layers > n_layers:
        return 1.0
    return n_gpu_layers / (n_layers + 1)
