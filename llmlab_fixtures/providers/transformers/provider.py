"""In-process Hugging Face transformers backend: TransformersProvider loads the model (locate) and holds its
tokens, speed probes, model info and memory estimate; it scores log-likelihoods with LoglikelihoodScoring (scoring)
and generates with GreedyGeneration (generation). Every load uses ``local_files_only=True``.
"""

from __future__ import annotations

import gc
import inspect
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import LlmlabError, ModelUnavailable
from llmlab_fixtures.models.torch_device import choose_dtype, resolve_device
from llmlab_fixtures.providers.base import ModelInfo, Provider
from llmlab_fixtures.providers.tokens import probe_tokens, split_context
from llmlab_fixtures.providers.transformers.generation import GreedyGeneration
from llmlab_fixtures.providers.transformers.gguf_conversion import GgufConversion, conversion_cache_enabled
from llmlab_fixtures.providers.transformers.locate import (
    _WEIGHT_GLOBS,
    ModelSource,
    _require_packages,
    check_gguf_architecture,
    resolve_source,
)
from llmlab_fixtures.providers.transformers.scoring import (
    _LOGITS_BUDGET,
    _PACK_TOKENS,
    AUTO_MAX_BATCH,
    LoglikelihoodScoring,
    _has_sliding_window,
)

_DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer names a context length (lm-eval's default)
_MEMORY_CONTEXT = 4096  # tokens of KV cache counted by estimate_memory
# end-of-turn tokens llama.cpp also treats as end of generation when the vocabulary has them as special tokens
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
              "<|end|>", "<eos>", "</s>")


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[: len(minimum)]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= minimum


class TransformersProvider(LoglikelihoodScoring, GreedyGeneration, Provider):
    """A causal LM loaded in this process with transformers; packed (token-tree) scoring, left-padded generation."""

    backend = "transformers"
    supports_loglikelihood = True
    loglik_items_per_call = 64  # items per loglikelihood() call: their requests are packed as token trees
    generation_rows = 8  # prompts generated side by side (32 on a GPU): each new token is one batched step
    generation_items_per_call = 256  # prompts per generate_stream() call (rows are refilled within a call)

    def __init__(
        self,
        source: ModelSource,
        name: str,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        threads: int | None = None,
        seed: int = 1234,
        max_length: int | None = None,
        dtype: str = "auto",
        share_prefix: bool = True,
    ) -> None:
        self.source = source
        self.requested_dtype = dtype  # auto: choose_dtype() for the device
        self.name = name
        self.requested_device = device
        self.batch_size = batch_size  # None = auto
        self.threads = threads
        self.seed = seed  # decoding is greedy; kept for the record
        self.requested_max_length = max_length
        self.device: str | None = None
        self.dtype: Any = None
        self.max_length = 0
        self.add_bos = False
        self.bos_id: int | None = None
        self.eos_id: int | None = None
        self.pad_id = 0
        self.eog_ids: set[int] = set()
        self._auto_batch = AUTO_MAX_BATCH
        self._model: Any = None
        self._tokenizer: Any = None
        self._meta: dict[str, Any] | None = None
        self._mask_logits = False  # the model's forward takes a boolean logits_to_keep mask (gathered logits)
        self.share_prefix = share_prefix  # reuse the KV cache of shared prefixes (off for sliding-window models)
        self._cache_kwarg = "past_key_values"  # the forward's KV cache argument ("cache" from transformers 5.2x)
        self._prefix = None  # the shared prefix's KV cache (LoglikelihoodScoring)
        self._pack_tokens = _PACK_TOKENS["cpu"]
        self._attention = "sdpa"  # the model's attention implementation (the packed mask's form depends on it)
        self.tree_blocks = True  # SDPA over blocks of a packed tree instead of one masked pass (tree_attention)
        self._conversion_state: str | None = None  # GGUF sources: "converted now" or "loaded saved"
        self._continuous = True  # rows refilled as replies end (transformers_generation); else left-padded batches

    # --- lifecycle -------------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF header fields for GGUF sources (read without loading), else config.json."""
        if self._meta is None:
            if self.source.is_gguf:
                self._meta = check_gguf_architecture(self.source.path)
            else:
                self._meta = json.loads((self.source.path / "config.json").read_text())
        return self._meta

    def initialize(self) -> None:
        """Load tokenizer and model on the chosen device in the chosen dtype; LlmlabError with a fix on failure.

        ``threads`` sets torch's intra-op threads for the whole process (torch.set_num_threads).
        """
        if self._model is not None:
            return
        _require_packages(self.source.is_gguf)
        import torch

        arch = self.metadata.get("architecture") or self.metadata.get("model_type")
        self.device = resolve_device(self.requested_device)
        if not self.device.startswith("cpu"):
            self.generation_rows, self.generation_items_per_call = 32, 1024
        self.dtype = choose_dtype(self.device, arch) if self.requested_dtype in ("auto", None) \
            else getattr(torch, self.requested_dtype)
        if self.threads:
            torch.set_num_threads(self.threads)
        self._guarded(self._load_model)

    def set_threads(self, threads: int) -> bool:
        """torch's intra-op threads for this process, from the next forward pass on."""
        import torch

        self.threads = threads
        torch.set_num_threads(threads)
        return True

    def load_tokenizer(self) -> None:
        """Load only the tokenizer (token counts and checks without the weights); initialize() does this too."""
        if self._tokenizer is None:
            _require_packages(self.source.is_gguf)
            self._guarded(lambda: self._load_tokenizer(self._conversion()))

    def _guarded(self, load: Any) -> None:
        try:
            load()
        except LlmlabError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            self.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelUnavailable(f"transformers could not load {self.source.path}: {first}") from exc

    def _where(self, converted: Path | None = None) -> dict[str, Any]:
        """from_pretrained's location arguments: a saved conversion of the GGUF, the GGUF's directory and file
        name, or the model directory."""
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if converted is not None:
            return {"pretrained_model_name_or_path": str(converted), "local_files_only": True}
        if self.source.is_gguf:
            return {"pretrained_model_name_or_path": str(self.source.path.parent),
                    "gguf_file": self.source.path.name, "local_files_only": True}
        return {"pretrained_model_name_or_path": str(self.source.path), "local_files_only": True}

    def _conversion(self) -> GgufConversion | None:
        """Where this GGUF's converted tokenizer and weights are saved; None for other sources or cache off."""
        if not self.source.is_gguf or not conversion_cache_enabled():
            return None
        return GgufConversion.for_file(self.source.path)

    def _pretrained(self, load: Any, conversion: GgufConversion | None, saved: Path | None,
                    **kwargs: Any) -> tuple[Any, bool]:
        """``load`` (a from_pretrained) from the saved conversion when there is one, else from the source, and
        whether the saved one was used; a saved conversion that fails to load is deleted (and converted again)."""
        if conversion is not None and saved is not None:
            try:
                return load(**self._where(saved), **kwargs), True
            except Exception as exc:  # whatever broke the saved copy (safetensors raises its own error type)
                conversion.discard(saved, exc)
        return load(**self._where(), **kwargs), False

    def _load_tokenizer(self, conversion: GgufConversion | None) -> None:
        from transformers import AutoTokenizer

        saved = conversion.tokenizer_dir() if conversion else None
        self._tokenizer, from_saved = self._pretrained(AutoTokenizer.from_pretrained, conversion, saved)
        if conversion and not from_saved:
            conversion.save_tokenizer(self._tokenizer)
        self._setup_tokens()

    def _load_model(self) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        conversion = self._conversion()  # looked up once per load: the GGUF may have been replaced since the last
        if self._tokenizer is None:
            self._load_tokenizer(conversion)
        dtype_key = "dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"
        placement = {} if self.device == "cpu" else {"device_map": {"": self.device}}  # straight onto the GPU
        dtype_name = str(self.dtype).removeprefix("torch.")
        saved = conversion.model_dir(dtype_name) if conversion else None
        model, from_saved = self._pretrained(AutoModelForCausalLM.from_pretrained, conversion, saved,
                                             **{dtype_key: self.dtype}, **placement)
        if conversion is not None:
            if not from_saved:
                conversion.save_model(model, dtype_name)
            self._conversion_state = "loaded saved" if from_saved else "converted now"
        self._model = model.to(self.device).eval()
        module = sys.modules.get(type(self._model).__module__)
        self._mask_logits = module is not None and hasattr(module, "slice_logits_to_keep")
        if "cache" in inspect.signature(self._model.forward).parameters:
            self._cache_kwarg = "cache"
        self._attention = getattr(self._model.config, "_attn_implementation", None) or "eager"
        self._continuous = not _has_sliding_window(self._model.config) and self._attention in ("sdpa", "eager")
        if not self._continuous:
            self.share_prefix = False  # a sliding-window cache cannot be cut back; other kernels take no tree mask
        self._setup_scoring()
        self._setup_tokens()  # again: the model's config and generation config add end-of-generation ids
        config = self._model.config
        limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                      if isinstance(getattr(config, k, None), int)), None)
        if limit is None:
            model_max = getattr(self._tokenizer, "model_max_length", None)
            limit = model_max if isinstance(model_max, int) and model_max < 10**7 else _DEFAULT_CONTEXT
        self.max_length = self.requested_max_length or limit

    def _setup_tokens(self) -> None:
        tok = self._tokenizer
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        probe = "a"
        with_special = tok.encode(probe, add_special_tokens=True)
        without = tok.encode(probe, add_special_tokens=False)
        self.add_bos = bool(self.bos_id is not None and len(with_special) > len(without)
                            and with_special[0] == self.bos_id)
        eog: set[int] = set()
        model = self._model
        configs = (model.config, getattr(model, "generation_config", None)) if model is not None else ()
        for source in (*configs, tok):
            value = getattr(source, "eos_token_id", None)
            eog.update([value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)])
        special = set(getattr(tok, "all_special_tokens", ()) or ()) | {
            str(t) for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values() if getattr(t, "special", False)
        }
        for text in _EOG_TEXTS:
            if text in special:
                token_id = tok.convert_tokens_to_ids(text)
                if isinstance(token_id, int) and token_id >= 0:
                    eog.add(token_id)
        self.eog_ids = eog
        pad = tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def close(self) -> None:
        """Drop the model and tokenizer and give their memory back (CUDA cache included)."""
        had_model = self._model is not None
        self._prefix = None
        self._model = None
        self._tokenizer = None
        gc.collect()
        if had_model and self.device and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _require(self) -> Any:
        if self._model is None:
            raise LlmlabError(f"model {self.name} is not loaded; call initialize() first")
        return self._model

    # --- tokens --------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The model tokenizer's ids for ``text`` (special-token text not parsed); BOS first when the model adds it."""
        if self._tokenizer is None:
            raise LlmlabError(f"model {self.name} is not loaded; call initialize() or load_tokenizer() first")
        tokens = list(self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            tokens.insert(0, self.bos_id)
        return tokens

    @property
    def _prefix_token(self) -> int:
        """lm-eval's prefix token for an empty context: BOS, else EOS."""
        token = self.bos_id if self.bos_id is not None else self.eos_id
        return int(token if token is not None else self.pad_id)

    def encode_pair(self, context: str, continuation: str, contexts: dict[str, list[int]] | None = None
                    ) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, split as lm-evaluation-harness 0.4.x splits them."""
        return split_context(context, continuation, self.tokenize, self._prefix_token, contexts)

    # --- speed probes ----------------------------------------------------------------------------------

    def _forward_one_row(self, tokens: Sequence[int], cache: Any, logits_rows: int = 1) -> Any:
        """Run ``tokens`` after what ``cache`` holds, computing logits for the last ``logits_rows`` positions;
        returns the last position's logits."""
        import torch

        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return self._model(input_ids=ids, use_cache=True, logits_to_keep=logits_rows,
                               **{self._cache_kwarg: cache}).logits[0, -1]

    def _sync(self) -> None:
        if self.device and self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def time_prompt(self, n_tokens: int, logits_rows: int = 1) -> float:
        """Seconds to run ``n_tokens`` random tokens through the model into an empty KV cache, with logits for the
        last ``logits_rows`` positions (1, as llama-bench's pp; ``n_tokens``, as scoring every token needs)."""
        from transformers import DynamicCache

        self._require()
        tokens = probe_tokens(n_tokens, int(self._model.config.vocab_size), logits_rows)
        cache = DynamicCache(config=self._model.config)
        self._sync()
        started = time.perf_counter()
        self._forward_one_row(tokens, cache, logits_rows)
        self._sync()
        return time.perf_counter() - started

    def time_generation(self, n_tokens: int) -> float:
        """Seconds for ``n_tokens`` one-token forward passes with a KV cache, each feeding back the argmax."""
        from transformers import DynamicCache

        self._require()
        cache = DynamicCache(config=self._model.config)
        token = int(self._forward_one_row([self._prefix_token], cache).argmax())
        self._sync()
        started = time.perf_counter()
        for _ in range(n_tokens):
            token = int(self._forward_one_row([token], cache).argmax())
        self._sync()
        return time.perf_counter() - started

    # --- info ----------------------------------------------------------------------------------------

    def _quantization(self) -> str | None:
        if self.source.is_gguf:
            quant = self.metadata.get("quantization")
            return f"dequantised from {quant}" if quant else "dequantised GGUF"
        if self.dtype is not None:
            return str(self.dtype).removeprefix("torch.")
        return self.metadata.get("torch_dtype") or self.metadata.get("dtype")

    def _file_size(self) -> int | None:
        if self.source.is_gguf:
            return int(self.metadata.get("file_size") or self.source.path.stat().st_size)
        files = [p for pattern in _WEIGHT_GLOBS for p in self.source.path.glob(pattern)]
        return sum(p.stat().st_size for p in files) or None

    def get_model_info(self) -> ModelInfo:
        """What is known about the model: from the loaded model once initialised, else from file headers."""
        meta = self.metadata
        model = self._model
        config = model.config if model is not None else None
        if self.source.is_gguf:
            arch = meta.get("architecture")
            context = meta.get("context_length")
            params = meta.get("parameters")
            add_bos = meta.get("add_bos_token")
        else:
            arch = meta.get("model_type")
            context = meta.get("max_position_embeddings") or meta.get("n_positions")
            params = None
            add_bos = None
        if self._tokenizer is not None:
            add_bos = self.add_bos
        if model is not None:
            params = sum(p.numel() for p in model.parameters())
            arch = arch or getattr(config, "model_type", None)
        extra: dict[str, Any] = {
            "device": self.device or self.requested_device,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "source": self.source.kind,
            "repo": self.source.repo,
            "batch_size": self.batch_size if self.batch_size is not None else "auto",
            "auto_batch_max_rows": self._auto_batch if self.batch_size is None else None,
            "max_length": self.max_length or None,
            "model_class": type(model).__name__ if model is not None else None,
            "threads": self.threads,
            "seed": self.seed,
            "prefix_sharing": self.share_prefix,
            "gguf_conversion": self._conversion_state,  # "converted now" or "loaded saved" (GGUF sources)
        }
        if model is not None:
            import torch
            import transformers

            extra["transformers"] = transformers.__version__
            extra["torch"] = torch.__version__
        return ModelInfo(
            name=self.name,
            backend=self.backend,
            path=str(self.source.path),
            architecture=arch,
            parameters=int(params) if params else None,
            quantization=self._quantization(),
            context_length=int(context) if context else None,
            file_size=self._file_size(),
            add_bos_token=add_bos,
            data_location="in-process",
            extra=extra,
        )

    def estimate_memory(self) -> int:
        """Weights in the chosen dtype + a KV cache of up to 4k tokens + one auto batch of logits + overhead."""
        meta = self.metadata
        bytes_per = self.dtype.itemsize if self.dtype is not None else 4
        if self._model is not None:
            n_params = sum(p.numel() for p in self._model.parameters())
        elif self.source.is_gguf:
            n_params = int(meta.get("parameters") or 0)
        else:
            source_bytes = 2 if str(meta.get("torch_dtype") or meta.get("dtype")) in ("bfloat16", "float16") else 4
            n_params = (self._file_size() or 0) // source_bytes
        if self.source.is_gguf:
            n_layer = int(meta.get("block_count") or 0)
            heads_kv = meta.get("head_count_kv") or 0
            kv_heads = max(heads_kv) if isinstance(heads_kv, list) else int(heads_kv)
            head_dim = int(meta.get("key_length") or 0)
            context = int(meta.get("context_length") or _DEFAULT_CONTEXT)
            vocab = int(meta.get("vocab_size") or 0)
        else:
            n_layer = int(meta.get("num_hidden_layers") or meta.get("n_layer") or 0)
            heads = int(meta.get("num_attention_heads") or meta.get("n_head") or 1)
            kv_heads = int(meta.get("num_key_value_heads") or heads)
            head_dim = int(meta.get("head_dim") or (int(meta.get("hidden_size") or 0) // heads))
            context = int(meta.get("max_position_embeddings") or meta.get("n_positions") or _DEFAULT_CONTEXT)
            vocab = int(meta.get("vocab_size") or 0)
        kv = 2 * n_layer * kv_heads * head_dim * min(context, _MEMORY_CONTEXT) * bytes_per
        logits = min(_LOGITS_BUDGET, 4 * vocab * 512)
        return int(n_params * bytes_per + kv + logits + (128 << 20))


# --- dispatch-table entry points ----------------------------------------------------------------------


def check_spec(spec: Any, settings: Any) -> None:
    """``spec`` can run with transformers here (packages, files, architecture, device); never loads weights."""
    _require_packages(gguf=False)
    source = resolve_source(spec, settings)
    if source.is_gguf:
        _require_packages(gguf=True)
        check_gguf_architecture(source.path)
    resolve_device(settings.device)


def make_provider(spec: Any, settings: Any) -> TransformersProvider:
    """An uninitialised TransformersProvider for ``spec`` (a ModelSpec) with the run's BackendSettings."""
    return TransformersProvider(
        resolve_source(spec, settings),
        spec.label,
        device=settings.device,
        batch_size=settings.batch_size,
        threads=settings.threads,
        seed=settings.seed,
        max_length=getattr(settings, "n_ctx", None),
        dtype=getattr(settings, "dtype", "auto"),
    )
