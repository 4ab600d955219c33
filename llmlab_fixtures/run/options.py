"""Command-line options and the validated run configuration built from them."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.models.registry import load_models
from llmlab_fixtures.models.specs import SPEC_SYNTAX, ModelSpec, parse_specs
from llmlab_fixtures.run.availability import UnavailableModel
from llmlab_fixtures.run.checkpoint import DEFAULT_CHECKPOINT
from llmlab_fixtures.run.presets import PRESET_KEYS, describe, merge_with_preset

EXPORT_FORMATS = ("csv", "json", "markdown", "html")
SCORING_METHODS = ("auto", "loglik", "generate")
DEFAULT_MODELS = "local:smollm2-135m"


def add_options(parser: pytest.Parser) -> None:
    """Register llmlab's command-line options."""
    group = parser.getgroup("llmlab", "llmlab benchmark options")
    group.addoption("--models", default=None,
                    help=f"comma-separated models to benchmark (default {DEFAULT_MODELS}); each is {SPEC_SYNTAX}")
    group.addoption("--limit", default=None, help="score at most N items per dataset (the first N, like lm-eval)")
    group.addoption("--data-dir", default=None,
                    help="local mirror of the datasets (<dataset>/<split>.jsonl); default $LLMLAB_DATA_DIR, "
                         "else the Hugging Face Hub")
    group.addoption("--output-dir", default=None, help="results directory (default .llmlab/runs/<timestamp>)")
    group.addoption("--export-format", default=",".join(EXPORT_FORMATS),
                    help="comma-separated result formats among csv, json, markdown, html (report.html; default all); "
                         "items.jsonl is always written")
    group.addoption("--num-fewshot", default=None, help="override every task's number of few-shot examples")
    group.addoption("--fixed-fewshot", action="store_true",
                    help="use the same few-shot examples for every item (GSM8K; faster, not lm-eval's default)")
    group.addoption("--scoring", default="auto",
                    help="multiple choice by log-likelihood (loglik), by generated letter (generate), or auto: "
                         "loglik when every model in the run supports it")
    group.addoption("--seed", default="1234", help="seed for few-shot sampling and option shuffling (default 1234)")
    group.addoption("--threads", default=None,
                    help="CPU threads per model (default: physical cores / workers, or the preset's)")
    group.addoption("--model-dir", action="append", default=[], help="a directory with GGUF files (repeatable)")
    group.addoption("--local-only", action="store_true",
                    help="keep only local models (cloud models are dropped); the network guard comes with the "
                         "cloud backends")
    group.addoption("--use-local", action="store_true",
                    help="for an alias that exists both locally and as an API, use the local form")
    group.addoption("--gpu-layers", default=None,
                    help="layers to offload to the GPU for llama.cpp: a number, -1 (all) or auto (as many as fit "
                         "in free VRAM); default 0, or the preset's; falls back to the CPU when offload fails")
    group.addoption("--device", default="auto",
                    help="transformers device: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    group.addoption("--batch-size", default=None,
                    help="transformers rows per forward pass: a number, or auto (start high, halve on out-of-memory)")
    group.addoption("--parallel-sequences", default="4",
                    help="llama.cpp: items scored side by side, each in a KV-cache stream of its own, several per "
                         "llama_decode call (the same scores as one at a time; default 4; 1 = one at a time, with "
                         "less KV-cache memory and a checkpoint after every item)")
    group.addoption("--request-timeout", default="120",
                    help="seconds to wait for one HTTP response from Ollama or a cloud API (default 120)")
    group.addoption("--max-retries", default="4",
                    help="cloud APIs: retries on 429/5xx/timeouts with exponential backoff (default 4)")
    group.addoption("--concurrency", default="4",
                    help="Ollama, OpenAI-compatible servers and cloud APIs: requests in flight per model (default 4)")
    group.addoption("--max-memory", default=None,
                    help="refuse in-process models estimated to need more than this (e.g. 8GB, 512MiB); "
                         "default: the memory available when the run starts")
    group.addoption("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help=f"SQLite file where every finished item is committed; rerunning the same command resumes "
                         f"(default {DEFAULT_CHECKPOINT})")
    group.addoption("--no-checkpoint", action="store_true", help="neither read nor write item checkpoints")
    group.addoption("--fresh", action="store_true",
                    help="start over: forget the checkpointed items of the models and datasets this run scores")
    group.addoption("--quantization", default=None,
                    help="run each GGUF model's file of this quantization (e.g. Q4_K_M, Q8_0); a model without it "
                         "is skipped with the ones it has")
    group.addoption("--preset", default=None,
                    help="performance, quality or memory: defaults for --ctx-size, --batch-size, --threads, "
                         "--quantization, --gpu-layers and --dtype (options given explicitly win)")
    group.addoption("--ctx-size", default=None,
                    help="context size in tokens (llama.cpp n_ctx, transformers max length); default the model's, "
                         "capped at 8192")
    group.addoption("--dtype", default=None,
                    help="transformers weights dtype: auto (fp32 on CPU, bf16/fp16 on GPUs), float32, float16, "
                         "bfloat16")


@dataclass(frozen=True)
class RunConfig:
    """Everything a benchmark run needs to know, validated once."""

    models: tuple[ModelSpec, ...]
    output_dir: Path
    limit: int | None = None
    data_dir: Path | None = None
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    num_fewshot: int | None = None
    fixed_fewshot: bool = False
    scoring: str = "auto"
    seed: int = 1234
    threads: int | None = None
    model_dirs: tuple[Path, ...] = ()
    local_only: bool = False
    use_local: bool = False
    gpu_layers: int | None = 0  # None: auto (as many layers as fit in free VRAM)
    quantization: str | None = None
    preferred_quantization: str | None = None  # from a preset: used where a model has that GGUF
    preset: str | None = None
    preset_origin: dict[str, str] = field(default_factory=dict)  # knob -> "option" or "preset"
    ctx_size: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    parallel_sequences: int = 4
    request_timeout: float = 120.0
    max_retries: int = 4
    concurrency: int = 4
    dropped_models: tuple[str, ...] = ()
    max_memory: int | None = None
    checkpoint: Path | None = DEFAULT_CHECKPOINT  # None: --no-checkpoint
    fresh: bool = False
    unavailable: tuple[UnavailableModel, ...] = ()  # requested, checked, and not runnable here
    notices: tuple[str, ...] = field(default_factory=tuple)
    cost: Any = None  # cost.CostSettings: the cost report's assumptions (set by the plugin from options and ini)

    def public_dict(self) -> dict[str, Any]:
        """The configuration as written into results.json (no secrets are ever part of it)."""
        return {
            "models": [m.label for m in self.models],
            "limit": self.limit,
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "output_dir": str(self.output_dir),
            "export_formats": list(self.export_formats),
            "num_fewshot": self.num_fewshot,
            "fixed_fewshot": self.fixed_fewshot,
            "scoring": self.scoring,
            "seed": self.seed,
            "threads": self.threads,
            "local_only": self.local_only,
            "use_local": self.use_local,
            "gpu_layers": "auto" if self.gpu_layers is None else self.gpu_layers,
            "quantization": self.quantization,
            "preferred_quantization": self.preferred_quantization,
            "preset": self.preset,
            "preset_origin": dict(self.preset_origin),
            "ctx_size": self.ctx_size,
            "dtype": self.dtype,
            "device": self.device,
            "batch_size": self.batch_size or "auto",
            "parallel_sequences": self.parallel_sequences,
            "request_timeout": self.request_timeout,
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
            "max_memory": self.max_memory,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "fresh": self.fresh,
            "dropped_models": list(self.dropped_models),
            "unavailable_models": {u.label: u.reason for u in self.unavailable},
            "notices": list(self.notices),
        }


def _int_option(name: str, value: Any, *, minimum: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


def _float_option(name: str, value: Any, *, minimum: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {number:g}")
    return number


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
               "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(name: str, value: Any) -> int | None:
    """``8GB``, ``512MiB``, ``1.5g`` or bytes; sizes are binary (1 GB = 2**30 bytes), as memory is counted."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{name} must be a size such as 8GB or 512MiB, got {value!r}") from None
    if size <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return int(size)


def _batch_size_option(value: Any) -> int | None:
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    try:
        return _int_option("--batch-size", value, minimum=1)
    except ConfigError:
        raise ConfigError(f"--batch-size must be a whole number >= 1 or auto, got {value!r}") from None


def _device_option(value: Any) -> str:
    device = str(value or "auto").strip().lower()
    if device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


DTYPES = ("auto", "float32", "float16", "bfloat16")


def _gpu_layers_option(value: Any) -> int | None:
    if value is None:
        return 0
    if str(value).strip().lower() == "auto":
        return None
    try:
        return _int_option("--gpu-layers", value, minimum=-1) or 0
    except ConfigError:
        raise ConfigError(f"--gpu-layers must be a whole number >= -1 or auto, got {value!r}") from None


def _knob_values(knobs: dict[str, Any], device_option: Any, specs: list[ModelSpec]) -> dict[str, Any]:
    """Validate the preset-able knobs; a GPU that cannot be used falls back to the CPU with one notice."""
    from llmlab_fixtures.models.resources import llama_layers_fallback, torch_device_fallback

    threads = knobs.get("threads")
    dtype = str(knobs.get("dtype") or "auto").strip().lower()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {knobs.get('dtype')!r}")
    values: dict[str, Any] = {
        "threads": None if str(threads).lower() in ("none", "physical") else _int_option("--threads", threads,
                                                                                        minimum=1),
        "gpu_layers": _gpu_layers_option(knobs.get("gpu_layers")),
        "quantization": str(knobs["quantization"]).strip() if knobs.get("quantization") else None,
        "ctx_size": _int_option("--ctx-size", knobs.get("ctx_size"), minimum=16),
        "dtype": dtype,
        "batch_size": _batch_size_option(knobs.get("batch_size")),
        "device": _device_option(device_option),
        "shown": {k: knobs[k] for k in PRESET_KEYS if k in knobs},
        "notices": [],
    }
    backends = {s.backend for s in specs}
    if "llama-cpp" in backends:
        values["gpu_layers"], notice = llama_layers_fallback(values["gpu_layers"])
        values["notices"] += [notice] if notice else []
    if "transformers" in backends:
        values["device"], notice = torch_device_fallback(values["device"])
        values["notices"] += [notice] if notice else []
    return values


def default_output_dir() -> Path:
    """``.llmlab/runs/<timestamp>`` under the current directory."""
    return Path(".llmlab") / "runs" / time.strftime("%Y%m%d-%H%M%S")


def build_run_config(option: Any, output_dir: Path | None = None) -> RunConfig:
    """Validate pytest's parsed options into a RunConfig; ConfigError names the option to fix."""
    formats = tuple(f.strip().lower() for f in str(option.export_format).split(",") if f.strip())
    formats = tuple("markdown" if f in ("md",) else f for f in formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--export-format: unknown format {', '.join(unknown) or '(none)'}; "
                          f"choose among {', '.join(EXPORT_FORMATS)}")
    scoring = str(option.scoring).lower()
    if scoring not in SCORING_METHODS:
        raise ConfigError(f"--scoring must be one of {', '.join(SCORING_METHODS)}, got {option.scoring!r}")
    data_dir_value = option.data_dir or os.environ.get("LLMLAB_DATA_DIR")
    data_dir = Path(data_dir_value).expanduser() if data_dir_value else None
    if data_dir is not None and not data_dir.is_dir():
        raise ConfigError(f"data directory {data_dir} does not exist; point --data-dir (or LLMLAB_DATA_DIR) at "
                          "a mirror laid out as <dataset>/<split>.jsonl, e.g. ../shared/datasets")
    model_dirs = tuple(Path(p).expanduser() for p in option.model_dir)
    user_files = (Path("llmlab.toml"), Path("pyproject.toml"))
    specs = parse_specs(option.models or DEFAULT_MODELS, load_models(user_files), use_local=option.use_local)
    dropped: tuple[str, ...] = ()
    if option.local_only:
        dropped = tuple(s.label for s in specs if not s.is_local)
        specs = [s for s in specs if s.is_local]
        if not specs:
            raise ConfigError(f"--local-only leaves no model to run (dropped {', '.join(dropped)}); "
                              "add a local model, e.g. --models=local:smollm2-135m")
    knobs, origin = merge_with_preset(getattr(option, "preset", None), {k: getattr(option, k, None)
                                                                        for k in PRESET_KEYS})
    knobs = _knob_values(knobs, option.device, specs)
    notices = list(knobs.pop("notices"))
    if option.preset:
        notices.insert(0, describe(option.preset, knobs["shown"], origin))
    return RunConfig(
        models=tuple(specs),
        output_dir=output_dir or Path(option.output_dir or default_output_dir()),
        limit=_int_option("--limit", option.limit, minimum=1),
        data_dir=data_dir,
        export_formats=formats,
        num_fewshot=_int_option("--num-fewshot", option.num_fewshot, minimum=0),
        fixed_fewshot=bool(option.fixed_fewshot),
        scoring=scoring,
        seed=_int_option("--seed", option.seed, minimum=0) or 0,
        threads=knobs["threads"],
        model_dirs=model_dirs,
        local_only=bool(option.local_only),
        use_local=bool(option.use_local),
        gpu_layers=knobs["gpu_layers"],
        quantization=knobs["quantization"] if origin.get("quantization") == "option" else None,
        preferred_quantization=knobs["quantization"] if origin.get("quantization") == "preset" else None,
        preset=str(option.preset).strip().lower() if option.preset else None,
        preset_origin=origin,
        ctx_size=knobs["ctx_size"],
        dtype=knobs["dtype"],
        device=knobs["device"],
        batch_size=knobs["batch_size"],
        parallel_sequences=_int_option("--parallel-sequences", getattr(option, "parallel_sequences", 4),
                                       minimum=1) or 1,
        request_timeout=_float_option("--request-timeout", option.request_timeout, minimum=0.1),
        max_retries=_int_option("--max-retries", option.max_retries, minimum=0) or 0,
        concurrency=_int_option("--concurrency", option.concurrency, minimum=1) or 1,
        max_memory=parse_size("--max-memory", option.max_memory),
        checkpoint=None if option.no_checkpoint else Path(option.checkpoint).expanduser().absolute(),
        fresh=bool(option.fresh),
        dropped_models=dropped,
        notices=tuple(notices),
    )
