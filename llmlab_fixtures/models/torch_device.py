"""The torch device and dtype a model runs on, and which errors are out-of-memory failures (torch is imported
only when a function runs)."""

from __future__ import annotations

from typing import Any

from llmlab_fixtures.errors import ConfigError, ModelUnavailable


def resolve_device(requested: str | None) -> str:
    """``auto`` → cuda, then mps, then cpu; explicit cpu/cuda/cuda:N/mps are checked against this torch."""
    import torch

    device = (requested or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ModelUnavailable(f"--device {device} asks for CUDA, but torch {torch.__version__} sees no CUDA GPU; "
                                   "install a CUDA build of torch (see README) or use --device cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelUnavailable(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                   "use cuda:0 .. cuda:N-1")
        return device
    if device == "mps":
        if not mps_ok:
            raise ModelUnavailable("--device mps asks for Apple MPS, which this machine or torch build lacks; "
                                   "use --device cpu")
        return device
    raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {requested!r}")


def choose_dtype(device: str, architecture: str | None = None) -> Any:
    """fp32 on CPU; bf16 on CUDA when supported, else fp16; fp16 on MPS (fp32 for Gemma, which overflows fp16)."""
    import torch

    overflows_fp16 = "gemma" in (architecture or "").lower()
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32 if overflows_fp16 else torch.float16
    if device == "mps":
        return torch.float32 if overflows_fp16 else torch.float16
    return torch.float32


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures (the errors auto batching backs off from)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )
