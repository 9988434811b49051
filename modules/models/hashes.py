"""SHA-256 of model files, cached in A1111's ``cache.json`` layout.

Layout (shared with A1111, so an existing cache.json keeps its hashes)::

    {"hashes": {"checkpoint/sub/model.safetensors": {"mtime": 1700000000.0, "sha256": "<64 hex>"}},
     "<other sections>": ...}

Only the ``hashes`` section is touched; every other section is written back as it was read.
A cached hash is trusted only while the file's mtime equals the stored one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from modules.core.atomic import atomic_write_json

__all__ = ["HashCache", "file_sha256", "BLOCK_SIZE"]

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024
SECTION = "hashes"
_HEX = frozenset("0123456789abcdef")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hash a whole file in 1 MiB blocks, so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


def _valid_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value.lower()) <= _HEX


class HashCache:
    """Thread-safe sha256 cache persisted to ``cache_file`` (``None``: in memory only).

    The file is read lazily on first use and rewritten atomically after each new hash.
    Two threads asking for the same uncached file hash it once; different files hash in parallel.
    """

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._lock = threading.RLock()
        self._data: dict[str, Any] | None = None
        self._key_locks: dict[str, threading.Lock] = {}

    # -- persistence ---------------------------------------------------------------------------

    def _load_locked(self) -> dict[str, Any]:
        if self._data is not None:
            return self._data
        data: dict[str, Any] = {}
        if self.cache_file is not None and self.cache_file.exists():
            try:
                with open(self.cache_file, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                if not isinstance(loaded, dict):
                    raise ValueError(f"top level is {type(loaded).__name__}, expected an object")
                if not isinstance(loaded.get(SECTION, {}), dict):
                    raise ValueError(f"'{SECTION}' is {type(loaded[SECTION]).__name__}, expected an object")
                data = loaded
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                self._back_up_corrupt(exc)
                data = {}
        data.setdefault(SECTION, {})
        self._data = data
        return data

    def _back_up_corrupt(self, exc: Exception) -> None:
        assert self.cache_file is not None
        backup = self.cache_file.with_name(
            f"{self.cache_file.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.cache_file, backup)
            where = f"moved to {backup}"
        except OSError as move_exc:
            where = f"could not be moved aside ({move_exc}); it will be overwritten"
        log.warning("Hash cache %s is unreadable (%s); %s. Starting with an empty cache.",
                    self.cache_file, exc, where)

    def _save_locked(self) -> None:
        if self.cache_file is None or self._data is None:
            return
        try:
            atomic_write_json(self.cache_file, self._data)
        except (OSError, TypeError, ValueError) as exc:
            # A read-only data dir must not break generation; hashes are just recomputed next run.
            log.warning("Could not write hash cache %s: %s", self.cache_file, exc)

    # -- lookups -------------------------------------------------------------------------------

    def _lookup_locked(self, key: str, mtime: float) -> str | None:
        entry = self._load_locked()[SECTION].get(key)
        if not isinstance(entry, dict) or not _valid_sha256(entry.get("sha256")):
            return None
        cached_mtime = entry.get("mtime")
        if not isinstance(cached_mtime, (int, float)) or float(cached_mtime) != mtime:
            return None
        return entry["sha256"].lower()

    def cached_sha256(self, path: str | os.PathLike[str], cache_key: str) -> str | None:
        """The cached hash if still valid for the file on disk; never reads the file itself."""
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return None
        with self._lock:
            return self._lookup_locked(cache_key, mtime)

    def sha256(self, path: str | os.PathLike[str], cache_key: str) -> str:
        """Full-file sha256, from cache when the mtime matches, else computed and stored.

        Raises OSError if the file cannot be read.
        """
        with self._lock:
            key_lock = self._key_locks.setdefault(cache_key, threading.Lock())
        with key_lock:
            # Stat before reading: if the file changes while we hash, the stored mtime is stale
            # and the next call recomputes instead of trusting a hash of mixed contents.
            mtime = os.stat(path).st_mtime
            with self._lock:
                hit = self._lookup_locked(cache_key, mtime)
            if hit is not None:
                return hit
            started = time.monotonic()
            digest = file_sha256(path)
            log.info("Calculated sha256 of %s: %s (%.1fs)", path, digest[:10], time.monotonic() - started)
            with self._lock:
                self._load_locked()[SECTION][cache_key] = {"mtime": mtime, "sha256": digest}
                self._save_locked()
            return digest

    def forget(self, cache_key: str) -> None:
        with self._lock:
            if self._load_locked()[SECTION].pop(cache_key, None) is not None:
                self._save_locked()
