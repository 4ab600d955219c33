"""Helpers the benchmark scripts share: where the dataset mirror is, and SmolLM2 on either in-process backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf  # noqa: E402
from llmlab_fixtures.providers.base import Provider  # noqa: E402


def default_data_dir() -> Path:
    """``LLMLAB_DATA_DIR``, else ``../shared/datasets`` beside the repository."""
    env = os.environ.get("LLMLAB_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "datasets"


def smollm2_provider(backend: str, threads: int) -> Provider:
    """The embedded SmolLM2-135M GGUF on ``llama-cpp`` (quantised kernels) or ``transformers`` (dequantised, CPU)."""
    gguf = embedded_gguf(SMOLLM2)
    if backend == "llama-cpp":
        from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

        return LlamaCppProvider(gguf, "llama-cpp:smollm2-135m", n_threads=threads)
    from llmlab_fixtures.providers.transformers.locate import ModelSource
    from llmlab_fixtures.providers.transformers.provider import TransformersProvider

    return TransformersProvider(ModelSource("gguf", gguf), "transformers:smollm2-135m", device="cpu",
                                threads=threads)
