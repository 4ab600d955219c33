"""transformers' conversion of a GGUF file (tokenizer and dequantised weights), saved once so later loads skip it.

``from_pretrained(gguf_file=...)`` re-reads the GGUF's metadata several times, rebuilds the tokenizer from its
vocabulary and dequantises every tensor on every load: about 35 s for SmolLM2-135M on 2 cores, where the saved
conversion (``tokenizer.json`` and safetensors) loads in under a second with bit-identical logits and token ids.

A conversion lives in ``$LLMLAB_CACHE_DIR/converted/<gguf stem>-<key>/`` (``tokenizer/``, ``model-<dtype>/``,
``source.json``); the key hashes the GGUF's absolute path, size and modification time and the transformers
version, so a replaced file or a new transformers converts again, and each new conversion deletes the ones whose
GGUF is gone or changed (a reinstalled package, a new transformers), so stale copies do not pile up.
``llmlab cache list`` shows the conversions and ``llmlab cache remove`` deletes them; ``LLMLAB_CONVERSION_CACHE=0``
turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab_fixtures.models.gguf import default_cache_dir

CONVERTED_FOLDER = "converted"
SOURCE_FILE = "source.json"
_FREE_MARGIN = 1 << 30  # leave at least this much disk free after saving a conversion
_log = logging.getLogger("llmlab")


def conversion_cache_enabled() -> bool:
    """False when ``LLMLAB_CONVERSION_CACHE`` is 0, false, no or off."""
    return os.environ.get("LLMLAB_CONVERSION_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _source_facts(gguf: Path) -> dict[str, Any]:
    import transformers

    stat = gguf.stat()
    return {"gguf": str(gguf.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": transformers.__version__}


@dataclass(frozen=True)
class GgufConversion:
    """Where one GGUF's saved conversion lives, and how to read and write it."""

    gguf: Path
    root: Path
    facts: dict[str, Any] = field(compare=False)  # the GGUF as keyed, written to source.json with a save

    @classmethod
    def for_file(cls, gguf: Path, cache_dir: Path | None = None) -> GgufConversion:
        facts = _source_facts(gguf)
        key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
        return cls(gguf, (cache_dir or default_cache_dir()) / CONVERTED_FOLDER / f"{gguf.stem}-{key}", facts)

    def tokenizer_dir(self) -> Path | None:
        """The saved tokenizer's folder, or None before the first conversion."""
        folder = self.root / "tokenizer"
        return folder if (folder / "tokenizer_config.json").is_file() else None

    def model_dir(self, dtype: str) -> Path | None:
        """The saved weights in ``dtype`` (e.g. ``float32``), or None before the first load in that dtype."""
        folder = self.root / f"model-{dtype}"
        complete = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
        return folder if complete else None

    def save_tokenizer(self, tokenizer: Any) -> None:
        """Save a tokenizer loaded from the GGUF (best effort: a failure only costs the next load its time)."""
        self._save("tokenizer", tokenizer.save_pretrained, needed=0)

    def save_model(self, model: Any, dtype: str) -> None:
        """Save a model loaded from the GGUF as plain safetensors in ``dtype`` (best effort)."""
        needed = sum(p.numel() * p.element_size() for p in model.parameters())

        def save(folder: Path) -> None:
            # the weights are already dequantised; the GGUF "quantizer" only refuses serialisation
            quantizer, settings = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config",
                                                                                 None)
            model.hf_quantizer = None
            if settings is not None:
                del model.config.quantization_config
            try:
                model.save_pretrained(folder)
            finally:
                model.hf_quantizer = quantizer
                if settings is not None:
                    model.config.quantization_config = settings

        self._save(f"model-{dtype}", save, needed=needed)

    def _remove_stale(self) -> None:
        """Delete the other conversions whose GGUF no longer exists as it was converted, or whose transformers
        version is not this one."""
        for root, facts in converted_entries(self.root.parent.parent):
            if root == self.root or not facts:
                continue
            try:
                current = _source_facts(Path(str(facts.get("gguf"))))
            except OSError:
                current = None  # the GGUF is gone
            if current != facts:
                shutil.rmtree(root, ignore_errors=True)

    def discard(self, folder: Path, error: BaseException) -> None:
        """Delete a saved part that failed to load (the GGUF is converted again)."""
        _log.warning("the saved conversion %s failed to load (%s); converting %s again", folder, error,
                     self.gguf.name)
        shutil.rmtree(folder, ignore_errors=True)

    def _save(self, name: str, write: Any, *, needed: int) -> None:
        """``write(folder)`` into a private folder, then rename it into place (concurrent savers: first one wins)."""
        target = self.root / name
        partial = self.root / f".{name}.{os.getpid()}.partial"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if needed and shutil.disk_usage(self.root).free < needed + _FREE_MARGIN:
                _log.warning("not saving the converted %s of %s: less than %d MB free in %s", name, self.gguf.name,
                             (needed + _FREE_MARGIN) >> 20, self.root)
                return
            (self.root / SOURCE_FILE).write_text(json.dumps(self.facts, indent=1), encoding="utf-8")
            shutil.rmtree(partial, ignore_errors=True)
            write(partial)
            os.replace(partial, target)
            self._remove_stale()
        except OSError as exc:
            if not target.is_dir():
                _log.warning("could not save the converted %s of %s in %s: %s", name, self.gguf.name, self.root, exc)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def converted_entries(cache_dir: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every saved conversion: (its folder, the source.json facts of the GGUF it came from)."""
    folder = (cache_dir or default_cache_dir()) / CONVERTED_FOLDER
    found = []
    for root in sorted(folder.glob("*")) if folder.is_dir() else ():
        try:
            facts = json.loads((root / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            facts = {}
        if root.is_dir():
            found.append((root, facts))
    return found
