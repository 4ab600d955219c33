"""llama-cpp-python's ``Llama`` with CPU weight repacking off, as llmlab's own llama.cpp backend loads models.

llama.cpp moves weights into "extra" CPU buffer types (repacked layouts, Intel AMX tiles) unless a model is loaded
with ``use_extra_bufts`` off (llama.cpp's ``--no-repack``); ``Llama`` has no argument for it. llmlab's backend turns
it off for batch-invariant scores, and the reference models behind the loopback servers do the same. That also
keeps them off AMX: on a VM whose CPU advertises AMX, ggml's AMX matmul has crashed the process (SIGSEGV).

``python -m llmlab_fixtures.testing.no_repack <llama_cpp.server arguments>`` runs llama-cpp-python's server so.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any


def turn_off_weight_repacking() -> None:
    """Every model that llama-cpp-python's ``Llama`` loads from now on in this process skips extra buffer types."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params
    if getattr(original, "no_repack", False):
        return

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    default_params.no_repack = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = default_params


def load_llama(model_path: Path | str, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` without weight repacking."""
    from llama_cpp import Llama

    turn_off_weight_repacking()
    return Llama(model_path=str(model_path), **kwargs)


if __name__ == "__main__":
    turn_off_weight_repacking()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
