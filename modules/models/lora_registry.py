"""LoRA / LyCORIS files: ``models/Lora`` (``--lora-dir``) and ``models/LyCORIS``, recursive.

A network is named in prompts by its file stem or by its alias, as in A1111: the alias is kohya's
``ss_output_name`` training metadata; an alias two files share names neither (the stem still works).
Hashes are A1111's: the ``sshs_model_hash`` the trainer stored, else "AutoV3" (sha256 of a safetensors
file's tensor data after the header, as sd-webui-additional-networks defined it; sha256 of the whole
file for pickles); the infotext writes its first 12 hex digits.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from modules.models.network_files import NetworkFile, scan_network_files

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
HASH_BLOCK = 1 << 20


def lora_alias(stem: str, training_metadata: dict[str, str]) -> str:
    """What A1111 calls a network's alias: the trainer's output name, else the file stem."""
    alias = str(training_metadata.get("ss_output_name") or "").strip()
    return alias or stem


def sd_version(training_metadata: dict[str, str]) -> str:
    """A1111's guess of the base model from kohya metadata: "SDXL", "SD2", "SD1" or "Unknown"."""
    if str(training_metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(training_metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if training_metadata else "Unknown"


def autov3_hash(path: Path) -> str:
    """sha256 of what follows the safetensors header (AutoV3); of the whole file for other formats."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if path.suffix.lower() == ".safetensors":
            header_len = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + header_len)
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoraEntry:
    file: NetworkFile
    metadata: dict[str, str]
    alias: str
    scanned: tuple | None = field(default=None, repr=False)     # the file's stamp when metadata was read
    _hash: str | None = field(default=None, repr=False)
    _hash_stamp: tuple | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def sd_version(self) -> str:
        return sd_version(self.metadata)

    def stamp(self) -> tuple:
        st = self.path.stat()
        return (str(self.path), st.st_mtime_ns, st.st_size)

    def sha256(self) -> str:
        """The full hash (trainer's ``sshs_model_hash`` when stored), computed once per file version."""
        stored = self.metadata.get("sshs_model_hash", "")
        if stored:
            return stored
        stamp = self.stamp()
        if self._hash is None or self._hash_stamp != stamp:
            self._hash, self._hash_stamp = autov3_hash(self.path), stamp
        return self._hash

    @property
    def shorthash(self) -> str:
        return self.sha256()[:12]

    def api_dict(self) -> dict[str, Any]:
        """``GET /sdapi/v1/loras`` item, A1111's shape."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


class LoraRegistry:
    """The LoRA files under the roots, by stem and alias; rescanned by ``refresh``."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = [Path(r) for r in roots]
        self._lock = threading.Lock()
        self._entries: list[LoraEntry] = []
        self._by_name: dict[str, LoraEntry] = {}
        self._by_alias: dict[str, LoraEntry] = {}
        self._scanned = False

    def refresh(self) -> None:
        """Rescan the folders; files unchanged since the last scan keep their metadata and hash."""
        known = {e.path: e for e in self._entries}
        entries = [self._reuse(known.get(f.path), f) for f in scan_network_files(self.roots, LORA_EXTENSIONS)]
        by_name: dict[str, LoraEntry] = {}
        for entry in entries:
            by_name.setdefault(entry.name, entry)
        aliases: dict[str, list[LoraEntry]] = {}
        for entry in entries:
            aliases.setdefault(entry.alias.lower(), []).append(entry)
        # an alias shared by two files (or equal to another file's stem) names neither, as in A1111
        by_alias = {a: found[0] for a, found in aliases.items()
                    if len(found) == 1 and (found[0].name.lower() == a or a not in {n.lower() for n in by_name})}
        with self._lock:
            self._entries, self._by_name, self._by_alias, self._scanned = entries, by_name, by_alias, True

    def _reuse(self, old: LoraEntry | None, file: NetworkFile) -> LoraEntry:
        try:
            if old is not None and old.scanned is not None and old.stamp() == old.scanned:
                return LoraEntry(file=file, metadata=old.metadata, alias=old.alias, scanned=old.scanned,
                                 _hash=old._hash, _hash_stamp=old._hash_stamp)
        except OSError:
            pass
        return self._entry(file)

    @staticmethod
    def _entry(file: NetworkFile) -> LoraEntry:
        try:
            st = file.path.stat()
            scanned = (str(file.path), st.st_mtime_ns, st.st_size)
        except OSError:
            scanned = None
        metadata = file.training_metadata()
        return LoraEntry(file=file, metadata=metadata, alias=lora_alias(file.name, metadata), scanned=scanned)

    def _ensure(self) -> None:
        if not self._scanned:
            self.refresh()

    def list(self) -> list[LoraEntry]:
        self._ensure()
        return list(self._entries)

    def find(self, name: str) -> LoraEntry | None:
        """A prompt's ``<lora:name>``: an alias first, then the file stem (as A1111 looks names up)."""
        self._ensure()
        return self._by_alias.get(name.lower()) or self._by_name.get(name)

    def prompt_name(self, entry: LoraEntry, preferred: str = "Alias from file") -> str:
        """The name a card inserts (A1111's ``lora_preferred_name``): the alias when it is unambiguous."""
        if preferred == "Filename" or self._by_alias.get(entry.alias.lower()) is not entry:
            return entry.name
        return entry.alias
