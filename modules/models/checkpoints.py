"""Checkpoint registry: scan the model folder, name and hash checkpoints, resolve user queries.

Naming follows A1111 so settings, infotexts and API clients written for it keep working:
``name`` is the path relative to the checkpoint folder, ``title`` is ``name [shorthash]``
where the shorthash is the first 10 hex digits of the file's sha256 ("AutoV2").
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from modules.models.hashes import HashCache

__all__ = [
    "CHECKPOINT_EXTENSIONS", "CheckpointInfo", "CheckpointRegistry", "natural_sort_key",
    "scan_model_files",
]

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".ckpt", ".safetensors")
VAE_SUFFIXES = (".vae.ckpt", ".vae.safetensors", ".vae.pt")
SHORTHASH_LEN = 10
# Minimum length for a bare hex query to be taken as a hash prefix, so short names like "abc"
# are not mistaken for hashes.
MIN_HASH_PREFIX = 8

_HASH_SUFFIX = re.compile(r"\s\[[^\]]*\]$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def natural_sort_key(text: str) -> list[int | str]:
    """``a2`` before ``a10``, case-insensitive. Digit runs sit at odd indices, so keys compare."""
    return [int(part) if i % 2 else part.casefold() for i, part in enumerate(re.split(r"(\d+)", text))]


def scan_model_files(root: Path, accept: Callable[[str], bool]) -> list[Path]:
    """Files under ``root`` whose lowercase name passes ``accept``, in natural order of relative path.

    Follows symlinked directories but visits each real directory once (guards against loops),
    and skips anything hidden (a path component starting with ``.``).
    """
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(directory: Path) -> None:
        try:
            st = os.stat(directory)
        except OSError:
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            return
        seen_dirs.add(ident)
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            log.warning("Cannot list %s: %s", directory, exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                continue  # broken symlink or permission problem
            if is_dir:
                walk(Path(entry.path))
            elif is_file and accept(entry.name.lower()):
                found.append(Path(entry.path))

    if root.is_dir():
        walk(root)
    found.sort(key=lambda p: natural_sort_key(p.relative_to(root).as_posix()))
    return found


def _is_checkpoint_name(lower_name: str) -> bool:
    return lower_name.endswith(CHECKPOINT_EXTENSIONS) and not lower_name.endswith(VAE_SUFFIXES)


@dataclass
class CheckpointInfo:
    """One checkpoint file. ``title`` and ``ids`` are derived, so they follow ``sha256``."""

    filename: str
    name: str
    name_for_extra: str
    model_name: str
    sha256: str | None = None
    shorthash: str | None = None
    sidecar_config: Path | None = None

    @classmethod
    def from_path(cls, path: Path, ckpt_dir: Path, sha256: str | None = None) -> "CheckpointInfo":
        abspath = Path(os.path.abspath(path))
        root = Path(os.path.abspath(ckpt_dir))
        try:
            name = abspath.relative_to(root).as_posix()
        except ValueError:
            name = abspath.name  # --ckpt file outside the folder: A1111 uses the basename
        stem = abspath.name.rsplit(".", 1)[0] if "." in abspath.name else abspath.name
        sidecar = abspath.with_name(stem + ".yaml")
        info = cls(
            filename=str(abspath),
            name=name,
            name_for_extra=stem,
            model_name=os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0],
            sidecar_config=sidecar if sidecar.is_file() else None,
        )
        if sha256:
            info.set_sha256(sha256)
        return info

    def set_sha256(self, sha256: str) -> None:
        sha256 = sha256.lower()
        self.shorthash = sha256[:SHORTHASH_LEN]
        self.sha256 = sha256

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    @property
    def ids(self) -> list[str]:
        """Every string this checkpoint answers to exactly (see CheckpointRegistry.get_closest)."""
        ids = [self.title, self.name, self.model_name, self.name_for_extra]
        if self.shorthash and self.sha256:
            ids += [f"{self.name} [{self.shorthash}]", f"{self.name_for_extra} [{self.shorthash}]",
                    self.shorthash, self.sha256]
        return list(dict.fromkeys(ids))

    @property
    def cache_key(self) -> str:
        return f"checkpoint/{self.name}"

    def api_dict(self) -> dict[str, str | None]:
        """The shape of one entry of A1111's ``/sdapi/v1/sd-models``."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": str(self.sidecar_config) if self.sidecar_config else None,
        }


class CheckpointRegistry:
    """The list of known checkpoints. Thread-safe: ``refresh`` swaps in a new list atomically."""

    def __init__(self, ckpt_dir: Path, extra_files: Sequence[Path] = (),
                 hash_cache: HashCache | None = None, hashing: bool = True) -> None:
        self.ckpt_dir = Path(os.path.abspath(ckpt_dir))
        self.extra_files = [Path(p) for p in extra_files]
        # Without a cache file, hashes still survive refreshes within this process.
        self.hash_cache = hash_cache if hash_cache is not None else HashCache(None)
        self.hashing = hashing
        self._lock = threading.RLock()
        self._infos: list[CheckpointInfo] = []
        self._background: threading.Thread | None = None

    # -- scanning ------------------------------------------------------------------------------

    def refresh(self) -> list[CheckpointInfo]:
        """Rescan the folder and the extra files. Extra (``--ckpt``) files come first, as in A1111."""
        paths: list[Path] = []
        seen: set[str] = set()
        for extra in self.extra_files:
            if not extra.is_file():
                log.warning("Checkpoint %s does not exist; ignoring it", extra)
                continue
            if os.path.realpath(extra) not in seen:
                paths.append(extra)
                seen.add(os.path.realpath(extra))
        for path in scan_model_files(self.ckpt_dir, _is_checkpoint_name):
            # An extra file inside the folder is listed once, at the front.
            if os.path.realpath(path) in seen:
                continue
            paths.append(path)

        infos = []
        for path in paths:
            info = CheckpointInfo.from_path(path, self.ckpt_dir)
            if self.hashing:
                cached = self.hash_cache.cached_sha256(info.filename, info.cache_key)
                if cached:
                    info.set_sha256(cached)
            infos.append(info)
        with self._lock:
            self._infos = infos
        return list(infos)

    def list(self) -> list[CheckpointInfo]:
        with self._lock:
            return list(self._infos)

    def titles(self) -> list[str]:
        return [info.title for info in self.list()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._infos)

    def __iter__(self) -> Iterator[CheckpointInfo]:
        return iter(self.list())

    def empty_message(self) -> str:
        return (f"No checkpoints found. Put Stable Diffusion model files (.safetensors or .ckpt) in "
                f"{self.ckpt_dir} (subfolders are scanned too), then refresh the checkpoint list.")

    # -- hashing -------------------------------------------------------------------------------

    def calculate_shorthash(self, info: CheckpointInfo) -> str | None:
        """Hash the file (cached), update ``info`` in place and return the shorthash.

        Returns None without touching the file when hashing is disabled (``--no-hashing``).
        """
        if not self.hashing:
            return None
        # Always ask the cache: it is cheap on a hit and notices a file replaced since the scan.
        sha = self.hash_cache.sha256(info.filename, info.cache_key)
        info.set_sha256(sha)
        # The caller may hold an object from an older scan; keep the current list in step.
        with self._lock:
            for current in self._infos:
                if current is not info and current.filename == info.filename and current.name == info.name:
                    current.set_sha256(sha)
        return info.shorthash

    def hash_all_in_background(self) -> threading.Thread | None:
        """Start (once) a daemon thread that hashes every unhashed checkpoint; returns it."""
        if not self.hashing:
            return None
        with self._lock:
            if self._background is not None and self._background.is_alive():
                return self._background
            thread = threading.Thread(target=self._hash_all, name="checkpoint-hasher", daemon=True)
            self._background = thread
        thread.start()
        return thread

    def _hash_all(self) -> None:
        for info in self.list():
            if info.shorthash:
                continue
            try:
                self.calculate_shorthash(info)
            except OSError as exc:
                log.warning("Could not hash %s: %s", info.filename, exc)

    # -- lookup --------------------------------------------------------------------------------

    def get(self, title: str) -> CheckpointInfo | None:
        """Exact title only."""
        return next((info for info in self.list() if info.title == title), None)

    def get_closest(self, query: str) -> CheckpointInfo | None:
        """Resolve what a user, a setting, an infotext or an API call gave us, A1111-style.

        Tried in this order; within a step the first checkpoint in list order wins:

        1. exact title (``sub/model.safetensors [abcdef0123]``)
        2. exact name (relative path; backslashes accepted), or the absolute filename
        3. exact model_name (``sub_model``)
        4. exact stem (``model``, the name used by extra-networks style references)
        5. full sha256 or shorthash (case-insensitive)
        6. a hex string of at least 8 digits that prefixes a known sha256
        7. steps 2-4 again after stripping a trailing `` [...]`` (a title whose hash is stale,
           unknown, or was written while hashing was off)
        8. case-insensitive exact name / model_name / stem / basename
        9. case-insensitive substring of the title, shortest title wins (A1111's fallback)
        """
        query = (query or "").strip()
        if not query:
            return None
        infos = self.list()
        slashed = query.replace("\\", "/")

        def first(pred: Callable[[CheckpointInfo], bool]) -> CheckpointInfo | None:
            return next((info for info in infos if pred(info)), None)

        def exact_names(q: str) -> CheckpointInfo | None:
            return (first(lambda i: i.name == q or i.filename == q)
                    or first(lambda i: i.model_name == q)
                    or first(lambda i: i.name_for_extra == q))

        found = first(lambda i: i.title == query) or exact_names(slashed)
        if found:
            return found

        if _HEX.match(query):
            lower = query.lower()
            found = first(lambda i: i.sha256 == lower or i.shorthash == lower)
            if found is None and len(lower) >= MIN_HASH_PREFIX:
                found = first(lambda i: bool(i.sha256) and i.sha256.startswith(lower))
            if found:
                return found

        stripped = _HASH_SUFFIX.sub("", slashed).strip()
        if stripped != slashed:
            found = exact_names(stripped)
            if found:
                return found

        folded = stripped.casefold()
        found = (first(lambda i: i.name.casefold() == folded)
                 or first(lambda i: i.model_name.casefold() == folded)
                 or first(lambda i: i.name_for_extra.casefold() == folded)
                 or first(lambda i: i.name.rsplit("/", 1)[-1].casefold() == folded))
        if found:
            return found

        matches = [info for info in infos if folded in info.title.casefold()]
        return min(matches, key=lambda i: len(i.title)) if matches else None
