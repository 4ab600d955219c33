"""Run presets (``--preset performance|quality|memory``): defaults for context size, batch size, threads,
quantization, GPU layers and dtype, read from data/presets.toml. Options given explicitly always win."""

from __future__ import annotations

import sys
from functools import cache
from importlib.resources import files
from typing import Any

from llmlab_fixtures.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESET_KEYS = ("ctx_size", "batch_size", "threads", "quantization", "gpu_layers", "dtype")


@cache
def presets() -> dict[str, dict[str, Any]]:
    """Every preset: name -> {description, ctx_size, batch_size, threads, quantization, gpu_layers, dtype}."""
    text = files("llmlab_fixtures").joinpath("data/presets.toml").read_text(encoding="utf-8")
    return dict(tomllib.loads(text)["presets"])


def preset_values(name: str) -> dict[str, Any]:
    """The knob values of preset ``name``; ConfigError names the presets that exist."""
    table = presets()
    key = name.strip().lower()
    if key not in table:
        raise ConfigError(f"--preset must be one of {', '.join(table)}, got {name!r}")
    return {k: table[key][k] for k in PRESET_KEYS if k in table[key]}


def merge_with_preset(preset: str | None, explicit: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Values for the preset knobs: an explicit option (not None) wins over the preset.

    Returns the values and, per knob, where it came from (``option`` or ``preset``; knobs set by neither are
    left out of both).
    """
    from_preset = preset_values(preset) if preset else {}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key in PRESET_KEYS:
        if explicit.get(key) is not None:
            values[key], origin[key] = explicit[key], "option"
        elif key in from_preset:
            values[key], origin[key] = from_preset[key], "preset"
    return values, origin


def describe(preset: str, values: dict[str, Any], origin: dict[str, str]) -> str:
    """One report-header line: the preset and the values it set (options that overrode it are marked)."""
    parts = [f"{k.replace('_', '-')}={values[k]}" + (" (option)" if origin.get(k) == "option" else "")
             for k in PRESET_KEYS if k in values]
    return f"preset {preset}: {', '.join(parts)}"
