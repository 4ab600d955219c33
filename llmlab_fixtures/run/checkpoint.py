"""Item-level checkpoints: every finished item is committed to SQLite (WAL) as it completes, so a rerun resumes.

An item is found again only under the same model fingerprint (file sha256 / revision / API model), dataset, item
id and prompt digest (task definition, scoring method and the exact requests): changed settings never mix with old
results. Safe for several processes (pytest-xdist workers) and threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.eval.records import ItemRecord

DEFAULT_CHECKPOINT = Path(".llmlab") / "checkpoint.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    model_fp TEXT NOT NULL, dataset TEXT NOT NULL, item_id TEXT NOT NULL, digest TEXT NOT NULL,
    record TEXT NOT NULL, saved_at REAL NOT NULL,
    PRIMARY KEY (model_fp, dataset, item_id, digest)
);
CREATE TABLE IF NOT EXISTS file_digests (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
"""


class CheckpointStore:
    """The SQLite file behind checkpoints (one connection per process, shared by its threads under a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed item survives power loss
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use checkpoint file {self.path}: {exc}; pass --checkpoint PATH elsewhere "
                              "or --no-checkpoint") from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, model_fp: str, dataset: str, item_id: str, digest: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM items WHERE model_fp=? AND dataset=? AND item_id=? AND digest=?",
                (model_fp, dataset, item_id, digest)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, model_fp: str, dataset: str, item_id: str, digest: str, record: dict[str, Any]) -> None:
        """Commit one finished item (durable when this returns)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?)",
                             (model_fp, dataset, item_id, digest, json.dumps(record), time.time()))

    def forget(self, model_fp: str, dataset: str) -> int:
        """Drop a (model, dataset)'s saved items (``--fresh``); returns how many."""
        with self._lock:
            return self._db.execute("DELETE FROM items WHERE model_fp=? AND dataset=?", (model_fp, dataset)).rowcount

    def count(self, model_fp: str | None = None, dataset: str | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM items WHERE 1=1", []
        if model_fp is not None:
            query, args = query + " AND model_fp=?", [*args, model_fp]
        if dataset is not None:
            query, args = query + " AND dataset=?", [*args, dataset]
        with self._lock:
            return int(self._db.execute(query, args).fetchone()[0])

    def file_sha256(self, path: Path) -> str:
        """sha256 of a (model) file, remembered by path, size and mtime so big files are hashed once."""
        stat = path.stat()
        key = str(path.resolve())
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, sha256 FROM file_digests WHERE path=?", (key,)).fetchone()
        if row and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
            return str(row[2])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        value = digest.hexdigest()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?)",
                             (key, stat.st_size, stat.st_mtime_ns, value))
        return value


def model_fingerprint(store: CheckpointStore, info: dict[str, Any]) -> str:
    """What identifies a model's numbers: backend, weights (file sha256, else name/revision/endpoint), numerics."""
    path = info.get("path")
    weights = None
    if path and os.path.isfile(path):
        weights = f"sha256:{store.file_sha256(Path(path))}"
    elif path and os.path.isdir(path):  # a Hugging Face cache snapshot is named by its commit: the revision
        weights = f"dir:{Path(path).resolve()}"
    extra = info.get("extra") or {}
    parts = {
        "backend": info.get("backend"),
        "weights": weights or extra.get("revision") or extra.get("api_model") or info.get("name"),
        "base_url": extra.get("base_url"),
        "numerics": {k: extra.get(k) for k in ("device", "dtype", "n_gpu_layers") if k in extra},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TaskCheckpoint:
    """The ItemCache the evaluator uses for one (model, dataset): lookups and saves, counting resumed items."""

    def __init__(self, store: CheckpointStore, model_fp: str, dataset: str, *, model: str, backend: str,
                 fresh: bool = False) -> None:
        self.store, self.model_fp, self.dataset = store, model_fp, dataset
        self.model, self.backend = model, backend
        self.resumed = 0
        self.forgotten = store.forget(model_fp, dataset) if fresh else 0

    def has(self, item_id: str, digest: str) -> bool:
        """Whether the item is checkpointed (not counted as resumed: lookup() does that)."""
        return self.store.get(self.model_fp, self.dataset, item_id, digest) is not None

    def lookup(self, item_id: str, digest: str) -> ItemRecord | None:
        saved = self.store.get(self.model_fp, self.dataset, item_id, digest)
        if saved is None:
            return None
        self.resumed += 1
        record = ItemRecord.from_json(saved)
        record.model, record.backend = self.model, self.backend  # the same weights may run under another label
        return record

    def save(self, record: ItemRecord, digest: str) -> None:
        self.store.put(self.model_fp, self.dataset, record.item_id, digest, record.to_json())
