"""In-process Hugging Face transformers backend: batched log-likelihood and (batched) greedy generation.

A model comes from the local Hugging Face cache (a repo snapshot), a local directory with safetensors and a
tokenizer, or a GGUF file that transformers dequantises at load time (``gguf_file=``). Nothing is downloaded:
every load uses ``local_files_only=True``.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ConfigError, LlmlabError, ModelUnavailable
from llmlab_fixtures.models.files import resolve_gguf
from llmlab_fixtures.providers.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelInfo,
    Provider,
)
from llmlab_fixtures.providers.tokens import Reply, common_prefix_length, probe_tokens, split_context
from llmlab_fixtures.providers.transformers.generation import generate_rows
from llmlab_fixtures.providers.transformers.gguf_conversion import GgufConversion, conversion_cache_enabled
from llmlab_fixtures.providers.transformers.token_tree import PackedTree, pack_tree
from llmlab_fixtures.providers.transformers.tree_attention import (
    TREE_BLOCKS_KWARG,
    install_tree_attention,
    plan_blocks,
    tree_mask,
)

INSTALL_HINT = "pip install transformers gguf accelerate"
AUTO_MAX_BATCH = 64  # rows per forward pass where auto batching starts (halved on out-of-memory)
_TOKEN_BUDGET = {"cpu": 1024, "mps": 65_536, "cuda": 262_144}  # auto: rows x padded length per pass (CPU peaks near 1k)
_NORMALISER_ROWS = 32  # logits rows per logsumexp call (a 6 MB temporary for a 49k vocabulary)
_LOGITS_BUDGET = 1 << 30  # auto: bytes of fp32 logits per forward pass (rows' continuation tokens x vocab)
# tokens per packed forward pass (a token tree of many rows; halved on out-of-memory): on a CPU each pass costs about
# 60 ms besides its tokens, and with block attention a node's attention does not grow with the tree, so large trees
# pay off; masked (eager) attention grows with the square of the count and takes at most _PACK_TOKENS_DENSE
_PACK_TOKENS = {"cpu": 1536, "mps": 4096, "cuda": 4096}
_PACK_TOKENS_DENSE = 512
_DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer names a context length (lm-eval's default)
_MEMORY_CONTEXT = 4096  # tokens of KV cache counted by estimate_memory
# end-of-turn tokens llama.cpp also treats as end of generation when the vocabulary has them as special tokens
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
              "<|end|>", "<eos>", "</s>")
# GGUF architecture names that transformers' GGUF loader spells differently
_GGUF_ARCH_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "t5encoder": "t5"}
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# --- where the model comes from ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What ``initialize()`` loads: a GGUF file, a Hugging Face cache snapshot, or a local directory."""

    kind: str  # "gguf", "hf-cache" or "directory"
    path: Path  # the .gguf file, or the directory holding config.json + weights + tokenizer
    repo: str | None = None  # Hugging Face repo id, when known

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def _require_packages(gguf: bool) -> None:
    """ModelUnavailable naming the pip command when torch/transformers (and, for GGUF, gguf/accelerate) are missing."""
    if importlib.util.find_spec("torch") is None:
        raise ModelUnavailable(
            "torch is not installed; install the build you want first (CPU: pip install torch --index-url "
            f"https://download.pytorch.org/whl/cpu), then {INSTALL_HINT}"
        )
    needed = ("transformers", "gguf", "accelerate") if gguf else ("transformers",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailable(f"the transformers backend needs {', '.join(missing)}; run: {INSTALL_HINT}")


def _has_weights(directory: Path) -> bool:
    return any(next(directory.glob(pattern), None) is not None for pattern in _WEIGHT_GLOBS)


def cached_snapshot(repo: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo`` holding config.json and weights, or None (no network)."""
    from llmlab_fixtures.models.files import hf_cached_file

    config = hf_cached_file(repo, "config.json")
    return config.parent if config is not None and _has_weights(config.parent) else None


def _transformers_ways(entry: Any) -> str:
    from llmlab_fixtures.models.files import ways_to_get

    ways = [way for way in ways_to_get(entry) if "ollama" not in way]
    repo = (entry.transformers or {}).get("repo")
    if repo and not any(f"download {repo}`" in way for way in ways):
        ways.append(f"`huggingface-cli download {repo}`")
    return "; or ".join(ways) if ways else "register a transformers repo or a GGUF for it in llmlab.toml"


def _check_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path} has no config.json; a transformers model directory needs config.json, "
                               "*.safetensors weights and tokenizer files (or give a .gguf file)")
    if not _has_weights(path):
        raise ModelUnavailable(f"{path} has no *.safetensors (or pytorch_model*.bin) weights; "
                               "copy the model's weight files next to config.json")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelUnavailable(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                               "copy them from the model's repository")


def resolve_source(spec: Any, settings: Any) -> ModelSource:
    """Where ``spec`` (a ModelSpec) loads from; ModelUnavailable with the way to get it otherwise.

    An alias prefers its transformers repo when that is in the local Hugging Face cache, else its local GGUF.
    """
    target: str = spec.target
    entry = spec.entry
    if entry is not None:
        repo = (entry.transformers or {}).get("repo")
        if repo and (snapshot := cached_snapshot(repo)) is not None:
            return ModelSource("hf-cache", snapshot, repo)
        if entry.gguf:
            try:
                return ModelSource("gguf", resolve_gguf(entry, target, settings.model_dirs), repo)
            except ModelUnavailable:
                pass
        raise ModelUnavailable(f"model {entry.alias!r} is not available locally for transformers; "
                               f"get it with {_transformers_ways(entry)}")
    if target.lower().endswith(".gguf"):
        return ModelSource("gguf", resolve_gguf(None, target, settings.model_dirs, backend="transformers"))
    path = Path(target).expanduser()
    if path.is_dir():
        _check_directory(path)
        return ModelSource("directory", path)
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise ModelUnavailable(f"model directory {target} does not exist; check the path after transformers:")
    snapshot = cached_snapshot(target)
    if snapshot is None:
        raise ModelUnavailable(f"{target} is not in the local Hugging Face cache; get it with "
                               f"`huggingface-cli download {target}` (llmlab loads transformers models offline)")
    return ModelSource("hf-cache", snapshot, target)


def gguf_supported_architectures() -> set[str]:
    """GGUF architectures this transformers can load (read from its GGUF tables, without importing torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def check_gguf_architecture(path: Path) -> dict[str, Any]:
    """The GGUF header of ``path``; ModelUnavailable if transformers has no loader for its architecture."""
    from llmlab_fixtures.models.gguf import gguf_metadata

    meta = gguf_metadata(path)
    arch = str(meta.get("architecture") or "")
    names = {arch, arch.replace("-", "_"), _GGUF_ARCH_NAMES.get(arch, arch)}
    if names & gguf_supported_architectures():
        return meta
    try:  # architectures only the newer GGUF path knows (importing it imports torch)
        from transformers.integrations.gguf import GGUF_ARCHS

        if arch in GGUF_ARCHS:
            return meta
    except ImportError:
        pass
    import transformers

    raise ModelUnavailable(f"transformers {transformers.__version__} cannot load GGUF architecture {arch!r} "
                           f"({path.name}); run it with llama-cpp:{path} instead")


# --- device and dtype ---------------------------------------------------------------------------------


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


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[: len(minimum)]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= minimum


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures (the errors auto batching backs off from)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


# --- the provider -------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One log-likelihood request ready for the model: input tokens and the continuation tokens they predict."""

    index: int  # position in the caller's request list
    tokens: list[int]  # (context + continuation)[-(max_length + 1):][:-1]
    targets: list[int]  # the continuation tokens the last len(targets) positions predict
    context_tokens: int
    continuation_tokens: int
    readers: list[_Row] = field(default_factory=list)  # other requests with the same tokens: they read this row

    @property
    def n_keep(self) -> int:
        """Positions at the end of the row whose logits are read (the longest continuation among its readers)."""
        return max(len(r.targets) for r in (self, *self.readers))

    @property
    def first_target(self) -> int:
        """The first position whose logits are needed: a shared prefix must stop before it."""
        return len(self.tokens) - self.n_keep


def _merge_identical(rows: list[_Row]) -> list[_Row]:
    """One row per distinct input (MMLU's four one-token answers run the same context): the others read it."""
    first: dict[tuple[int, ...], _Row] = {}
    merged: list[_Row] = []
    for row in rows:
        owner = first.setdefault(tuple(row.tokens), row)
        if owner is row:
            merged.append(row)
        else:
            owner.readers.append(row)
    return merged


@dataclass
class _Prefix:
    """A batch-1 KV cache holding ``tokens``; ``new_tokens`` of them were run by the call that built it."""

    tokens: list[int]
    cache: Any
    new_tokens: int


def _cut_cache(cache: Any, length: int) -> None:
    """Drop every position of ``cache`` after the first ``length`` (transformers crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _has_sliding_window(config: Any) -> bool:
    """Whether some attention layers only see a window of recent tokens (Gemma 2/3, Mistral...)."""
    text = getattr(config, "get_text_config", lambda: config)()
    layer_types = getattr(text, "layer_types", None) or ()
    return bool(getattr(text, "sliding_window", None)) and (not layer_types or "sliding_attention" in layer_types)


def _shared_prefix_length(rows: Sequence[_Row]) -> int:
    """Tokens every row starts with, stopping before any row's first predicted position (its logits are needed)."""
    first = rows[0].tokens
    shared = min(r.first_target for r in rows)
    for row in rows[1:]:
        shared = min(shared, common_prefix_length(first, row.tokens))
    return shared


def _score_continuations(logits: Any, spans: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                         ) -> list[tuple[float, bool]]:
    """(sum of log-probs, whether every token is the argmax) per continuation: continuation i's tokens
    ``targets[i]`` are predicted by rows ``spans[i]`` of ``logits`` [rows, vocab].

    Vectorised over every continuation; the softmax normaliser is torch's fp32 logsumexp (within 1e-6 nat of an
    fp64 sum, as lm-eval's fp32 log_softmax is), taken ``_NORMALISER_ROWS`` rows at a time so its vocabulary-wide
    temporary is small and reused instead of a fresh allocation the size of ``logits`` (page faults cost more than
    the arithmetic). ``max`` gives argmax's index (the first of tied maxima) at a third of its cost on CPU.
    """
    import torch

    device = logits.device
    where = torch.tensor([row for span in spans for row in span], dtype=torch.long, device=device)
    wanted = torch.tensor([token for tokens in targets for token in tokens], dtype=torch.long, device=device)
    owner = torch.repeat_interleave(torch.arange(len(spans), device=device),
                                    torch.tensor([len(span) for span in spans], device=device))
    logits = logits.float()  # a copy only when the model returned half precision
    chosen = logits[where, wanted].double()
    best = logits.max(dim=-1).indices
    normalizer = torch.cat([torch.logsumexp(part, dim=-1) for part in logits.split(_NORMALISER_ROWS)]).double()
    logprobs = torch.zeros(len(spans), dtype=torch.float64, device=device).index_add_(
        0, owner, chosen - normalizer[where])
    misses = torch.zeros(len(spans), dtype=torch.long, device=device).index_add_(
        0, owner, (best[where] != wanted).long())
    return list(zip(logprobs.tolist(), (misses == 0).tolist()))


class _GenerationWatch:
    """A StoppingCriteria for generate() on a padded batch: timestamps the first new token and ends each row's
    Reply (EOG, a stop string or its own limit)."""

    def __init__(self, render: Callable[[Sequence[int]], str | None], prompt_len: int,
                 requests: Sequence[GenerationRequest]) -> None:
        self.render = render
        self.prompt_len = prompt_len
        self.first_token_at: float | None = None
        self.replies = [Reply([s for s in req.stop if s], req.max_new_tokens) for req in requests]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for row, reply in enumerate(self.replies):
            if reply.reason is None:
                reply.add(self.render(input_ids[row, self.prompt_len :].tolist()))
        return torch.tensor([r.reason is not None for r in self.replies], dtype=torch.bool, device=input_ids.device)


class TransformersProvider(Provider):
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
        self._prefix: _Prefix | None = None
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
        if self._attention == "sdpa":
            install_tree_attention()
        self._pack_tokens = _PACK_TOKENS.get(self.device.split(":")[0], _PACK_TOKENS["cpu"])
        if self._attention != "sdpa":
            self._pack_tokens = min(self._pack_tokens, _PACK_TOKENS_DENSE)
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

    # --- log-likelihood ------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        """Sum of continuation log-probs per request; results come back in the order given.

        With prefix sharing (the default), the token prefix every request shares (a few-shot block, a fixed
        primer) is run once into a KV cache that the next call reuses as far as it matches, and the rest is
        packed as a token tree (each distinct prefix once: an item's context for all its choices, identical
        inputs once). Without it, each request runs whole in right-padded batches, longest first.
        """
        self._require()
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        rows: list[_Row] = []
        tokenized: dict[str, list[int]] = {}  # each context once, however many choices share it
        for index, req in enumerate(requests):
            ctx, cont = self.encode_pair(req.context, req.continuation, tokenized)
            seq = (ctx + cont)[-(self.max_length + 1) :]  # left-truncate like lm-eval
            tokens = seq[:-1]
            n_cont = min(len(cont), len(tokens))
            if n_cont == 0:
                results[index] = LoglikelihoodResult(0.0, True, len(ctx), len(cont), 0)
                continue
            rows.append(_Row(index, tokens, seq[len(seq) - n_cont :], len(ctx), len(cont)))
        packed = rows and self.share_prefix
        for index, result in self._score_packed(_merge_identical(rows)) if packed else self._score_padded(rows):
            results[index] = result
        return [r for r in results if r is not None]

    def _score_padded(self, rows: list[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """Every row whole, in right-padded batches longest first (an out-of-memory error shows on the first)."""
        rows = sorted(rows, key=lambda r: (-len(r.tokens), r.tokens))
        scored: list[tuple[int, LoglikelihoodResult]] = []
        start = 0
        while start < len(rows):
            size = self._batch_rows(rows, start)
            batch = rows[start : start + size]
            try:
                scored += self._score_batch(batch)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                if self.batch_size is not None:
                    raise LlmlabError(f"{self.name} ran out of memory on {self.device} scoring {size} rows of "
                                      f"{len(batch[0].tokens)} tokens; lower --batch-size or use --batch-size auto"
                                      ) from exc
                if size == 1:
                    raise self._one_row_too_big(len(batch[0].tokens)) from exc
                self._auto_batch = max(1, size // 2)
                continue
            start += size
        return scored

    def _one_row_too_big(self, n_tokens: int) -> LlmlabError:
        return LlmlabError(f"{self.name} ran out of memory on {self.device} scoring one row of {n_tokens} tokens; "
                           "use fewer few-shot examples, a smaller model or another --device")

    def _score_packed(self, rows: list[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """The shared prefix from the KV cache, then the rest packed as token trees of up to ``_pack_tokens``
        nodes (at most --batch-size rows each when set), one forward pass per tree."""
        shared = _shared_prefix_length(rows)
        prefix = self._prefix_state(rows[0].tokens[:shared]) if shared else None
        rows = sorted(rows, key=lambda r: r.tokens[shared:])  # rows that share a prefix side by side
        suffixes = [r.tokens[shared:] for r in rows]
        keep = [r.n_keep for r in rows]
        scored: list[tuple[int, LoglikelihoodResult]] = []
        first = 0
        while first < len(rows):
            tree = pack_tree(suffixes, keep, first, max_nodes=self._pack_tokens,
                             max_kept=max(1, _LOGITS_BUDGET // self._logits_row_bytes()), max_sequences=self.batch_size)
            try:
                scored += self._score_tree(rows[first : first + tree.count], tree, prefix, shared)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                if tree.count == 1:
                    raise self._one_row_too_big(shared + len(tree.tokens)) from exc
                if self.batch_size is not None:
                    raise LlmlabError(f"{self.name} ran out of memory on {self.device} scoring {tree.count} rows "
                                      "in one pass; lower --batch-size or use --batch-size auto") from exc
                self._pack_tokens = max(1, len(tree.tokens) // 2)
                continue
            first += tree.count
        if prefix is not None and prefix.new_tokens:  # the shared prefix's cost goes to the first request
            scored[0][1].evaluated_tokens += prefix.new_tokens
        return scored

    def _score_tree(self, rows: Sequence[_Row], tree: PackedTree, prefix: _Prefix | None,
                    shared: int) -> list[tuple[int, LoglikelihoodResult]]:
        """One forward pass over a packed token tree after ``shared`` cached tokens: each node attends to the
        cached prefix, its ancestors and itself, at position ``shared`` + its depth."""
        import torch

        n = len(tree.tokens)
        allowed = tree_mask(tree, shared)
        blocks = plan_blocks(tree, allowed, shared, prefix_apart=self.device.startswith("cpu")) \
            if self.tree_blocks and self._attention == "sdpa" else None
        if self._attention != "sdpa":  # eager attention adds the mask to its scores
            allowed = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        keep = torch.zeros((1, n), dtype=torch.bool)
        keep[0, tree.kept] = True
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([tree.tokens], dtype=torch.long, device=self.device),
            "position_ids": torch.tensor([tree.depths], dtype=torch.long, device=self.device) + shared,
            "attention_mask": allowed[None, None].to(self.device),
            "use_cache": prefix is not None,
        }
        if prefix is not None:
            kwargs[self._cache_kwarg] = prefix.cache
        if self._mask_logits:
            kwargs["logits_to_keep"] = keep.to(self.device)
        if blocks is not None:
            kwargs[TREE_BLOCKS_KWARG] = blocks.to(self.device)
        try:
            with torch.inference_mode():
                logits = self._model(**kwargs).logits
        finally:
            if prefix is not None:
                _cut_cache(prefix.cache, shared)  # the tree's tokens leave the cache; the shared prefix stays
        position = {node: i for i, node in enumerate(tree.kept)}
        # (request, its tree path, tokens it evaluated): identical requests read their owner's row, evaluating none
        readers = [(reader, path, new if reader is row else 0) for row, path, new in
                   zip(rows, tree.paths, tree.new_nodes) for reader in (row, *row.readers)]
        with torch.inference_mode():
            picked = logits if self._mask_logits else logits[0][keep[0].to(logits.device)]  # [kept nodes, vocab]
            del logits
            scores = _score_continuations(
                picked, [[position[node] for node in path[len(path) - len(reader.targets):]]
                         for reader, path, _ in readers], [reader.targets for reader, _, _ in readers])
        return [(reader.index, LoglikelihoodResult(
            logprob=logprob, is_greedy=greedy, context_tokens=reader.context_tokens,
            continuation_tokens=reader.continuation_tokens, evaluated_tokens=new,
        )) for (reader, _, new), (logprob, greedy) in zip(readers, scores)]

    def _prefix_state(self, tokens: list[int]) -> _Prefix:
        """A batch-1 KV cache holding exactly ``tokens``: the previous call's cache cut back to the common prefix,
        then extended."""
        import torch
        from transformers import DynamicCache

        held = self._prefix
        keep = common_prefix_length(held.tokens, tokens) if held is not None else 0
        if held is None or keep == 0:
            cache = DynamicCache(config=self._model.config)
        else:
            cache = held.cache
            _cut_cache(cache, keep)
        if keep < len(tokens):
            ids = torch.tensor([tokens[keep:]], dtype=torch.long, device=self.device)
            positions = torch.arange(keep, len(tokens), device=self.device)[None, :]
            mask = torch.ones((1, len(tokens)), dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self._cache_kwarg: cache})
        self._prefix = _Prefix(list(tokens), cache, len(tokens) - keep)
        return self._prefix

    def _batch_rows(self, rows: Sequence[_Row], start: int) -> int:
        """Rows in the next padded forward pass: --batch-size, or auto (the remembered size, within memory budgets
        for the padded tokens and the logits read)."""
        if self.batch_size is not None:
            return min(self.batch_size, len(rows) - start)
        device = (self.device or "cpu").split(":")[0]
        budget = _TOKEN_BUDGET.get(device, _TOKEN_BUDGET["cpu"])
        max_rows = min(self._auto_batch, max(1, budget // len(rows[start].tokens)))
        vocab_bytes = self._logits_row_bytes()
        size, n_logits = 0, 0
        while start + size < len(rows) and size < max_rows:
            n_logits += rows[start + size].n_keep
            if size and n_logits * vocab_bytes > _LOGITS_BUDGET:
                break
            size += 1
        return max(1, size)

    def _logits_row_bytes(self) -> int:
        """Bytes of one position's fp32 logits (the whole vocabulary)."""
        return 4 * int(getattr(self._model.config, "vocab_size", 0) or len(self._tokenizer))

    def _score_batch(self, batch: Sequence[_Row]) -> list[tuple[int, LoglikelihoodResult]]:
        """One right-padded forward pass over ``batch`` (rows sorted longest first); (request index, result) for
        every row."""
        import torch

        width = len(batch[0].tokens)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, row in enumerate(batch):
            n = len(row.tokens)
            ids[b, :n] = torch.tensor(row.tokens, dtype=torch.long)
            mask[b, :n] = 1
            keep[b, n - row.n_keep : n] = True  # positions whose logits predict the continuation
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                                  "use_cache": False}
        if self._mask_logits:
            kwargs["logits_to_keep"] = keep.to(self.device)
        spans, offset = [], 0
        for row in batch:
            spans.append(range(offset, offset + row.n_keep))
            offset += row.n_keep
        with torch.inference_mode():
            logits = self._model(**kwargs).logits
            picked = logits if self._mask_logits else logits[keep.to(logits.device)]  # [total targets, vocab]
            del logits
            scores = _score_continuations(picked, spans, [row.targets for row in batch])
        return [(row.index, LoglikelihoodResult(
            logprob=logprob, is_greedy=greedy, context_tokens=row.context_tokens,
            continuation_tokens=row.continuation_tokens, evaluated_tokens=len(row.tokens),
        )) for row, (logprob, greedy) in zip(batch, scores)]

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

    def _release_memory(self) -> None:
        gc.collect()
        if self.device and self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        elif self.device == "mps":
            import torch

            torch.mps.empty_cache()

    # --- generation ----------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Greedy decoding of one request (a batch of one)."""
        return self.generate_batch([request])[0]

    def generate_stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
        """Greedy decoding, ``generation_rows`` prompts at a time, yielded as each reply ends at EOG, a stop string or
        its limit. Each prompt is prefilled alone and its row takes the next prompt as soon as its reply ends
        (transformers_generation); models whose attention cannot take that cache (sliding windows, other kernels)
        generate in left-padded batches instead. Times run from when an item's prompt took its row."""
        self._require()
        active = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
        for i, r in enumerate(requests):
            if r.max_new_tokens <= 0:
                yield i, GenerationResult("", len(self.tokenize(r.prompt)), 0, None, 0.0,
                                          extra={"stop_reason": "length"})
        if self._continuous:
            for n, result in self._generate_continuously([requests[i] for i in active]):
                yield active[n], result
            return
        for start in range(0, len(active), self.generation_rows):
            chunk = active[start : start + self.generation_rows]
            yield from zip(chunk, self._generate_rows([requests[i] for i in chunk]))

    def _generation_prompt(self, request: GenerationRequest, max_new: int) -> list[int]:
        """The request's prompt tokens, left-truncated so the prompt and ``max_new`` tokens fit the context."""
        tokens = self.tokenize(request.prompt) or [self._prefix_token]
        return tokens[-(self.max_length - max_new) :]

    def _generate_continuously(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, GenerationResult]]:
        import torch

        if not requests:
            return
        prompts = []
        for index, request in enumerate(requests):
            reply = Reply([s for s in request.stop if s], max(1, min(request.max_new_tokens, self.max_length - 1)))
            prompts.append((index, self._generation_prompt(request, reply.limit), reply))
        capacity = max(len(prompt) + reply.limit for _, prompt, reply in prompts) + 1
        mask_dtype = torch.bool if self._attention == "sdpa" else self.dtype
        with torch.inference_mode():  # the cache's tensors are inference tensors: rows are copied in this mode too
            yield from generate_rows(self._forward_rows, self._render, prompts, rows=self.generation_rows,
                                     capacity=capacity, device=self.device, mask_dtype=mask_dtype)

    def _decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _render(self, tokens: Sequence[int]) -> str | None:
        """A reply's text so far; None when its last token ends generation."""
        return None if tokens and tokens[-1] in self.eog_ids else self._decode(tokens)

    def _forward_rows(self, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        """One forward pass through a SlotCache: logits of each row's last position."""
        return self._model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                           logits_to_keep=1, **{self._cache_kwarg: cache}).logits

    def _generate_rows(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        started = time.perf_counter()
        max_new = max(1, min(max(r.max_new_tokens for r in requests), self.max_length - 1))
        prompts = [self._generation_prompt(req, max_new) for req in requests]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, tokens in enumerate(prompts):
            ids[b, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[b, width - len(tokens) :] = 1
        limited = [GenerationRequest(r.prompt, r.stop, min(r.max_new_tokens, max_new)) for r in requests]
        watch = _GenerationWatch(self._render, width, limited)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, pad_token_id=self.pad_id,
                                  eos_token_id=sorted(self.eog_ids) or None, bos_token_id=self.bos_id)
        with torch.inference_mode():
            output = self._model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config, stopping_criteria=StoppingCriteriaList([watch]))
        total = time.perf_counter() - started
        ttft = None if watch.first_token_at is None else watch.first_token_at - started
        results = []
        for b, req in enumerate(limited):
            reply = watch.replies[b]
            if reply.reason is None:  # the batch ended at max_new_tokens before this row's watch saw it finish
                reply.n_tokens, reply.reason = min(len(output[b]) - width, req.max_new_tokens), "length"
                reply.text = self._decode(output[b, width : width + reply.n_tokens].tolist())
            n_tokens, reason, text = reply.n_tokens, reply.reason, reply.text
            results.append(GenerationResult(
                text=text,
                prompt_tokens=len(prompts[b]),
                completion_tokens=n_tokens,
                ttft_s=ttft,
                total_s=total,
                evaluated_tokens=len(prompts[b]),
                extra={"stop_reason": reason, "batch_rows": len(requests)},
            ))
        return results

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
