"""VAE registry and A1111's ``sd_vae`` setting semantics.

Setting values:
- ``"Automatic"`` (also ``""``): a VAE made for the checkpoint if one exists, else the baked-in VAE.
  Looked for in this order:
    1. beside the checkpoint with the same stem: ``model.vae.safetensors``, ``model.vae.pt``,
       ``model.vae.ckpt`` (safest format first);
    2. in the VAE folder, a file whose stem equals the checkpoint stem, then ``<stem>.vae``,
       then any whose stem starts with the checkpoint stem (A1111's prefix rule), in list order.
- ``"None"``: the checkpoint's baked-in VAE (``resolve`` returns None).
- anything else: a VAE by name (see ``VaeRegistry.find``).

Unknown name: ``resolve`` raises ``UnknownVaeError`` (a KeyError listing the choices) by default,
because silently swapping the VAE changes colours without telling anyone; an API request with a
typo should fail loudly. Callers restoring a possibly stale saved setting pass ``strict=False``
to fall back to Automatic with a logged warning instead.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from modules.models.checkpoints import scan_model_files
from modules.models.hashes import HashCache

__all__ = ["VaeInfo", "VaeRegistry", "UnknownVaeError", "AUTOMATIC", "NONE", "VAE_EXTENSIONS"]

log = logging.getLogger(__name__)

AUTOMATIC = "Automatic"
NONE = "None"
VAE_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
BESIDE_CHECKPOINT_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


@dataclass(frozen=True)
class VaeInfo:
    filename: str
    name: str

    @property
    def stem(self) -> str:
        base = os.path.basename(self.filename)
        return base.rsplit(".", 1)[0] if "." in base else base


class UnknownVaeError(KeyError):
    def __init__(self, name: str, choices: list[str]) -> None:
        self.name = name
        self.choices = choices
        listed = ", ".join(repr(c) for c in choices) if choices else "(no VAE files found)"
        super().__init__(f"Unknown VAE {name!r}. Choices: {AUTOMATIC!r}, {NONE!r}, {listed}")

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0])


def _checkpoint_stem(checkpoint_filename: str) -> str:
    base = os.path.basename(checkpoint_filename)
    return base.rsplit(".", 1)[0] if "." in base else base


class VaeRegistry:
    """VAE files from ``vae_dir`` (recursive) plus ``*.vae.*`` files beside checkpoints.

    Names are file basenames (A1111's setting values and infotext ``VAE:`` field); if two files
    share a basename the later one is named by its path relative to its folder instead.
    """

    def __init__(self, vae_dir: Path, ckpt_dir: Path, hash_cache: HashCache | None = None) -> None:
        self.vae_dir = Path(os.path.abspath(vae_dir))
        self.ckpt_dir = Path(os.path.abspath(ckpt_dir))
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._infos: list[VaeInfo] = []

    def refresh(self) -> list[VaeInfo]:
        in_vae_dir = scan_model_files(self.vae_dir, lambda n: n.endswith(VAE_EXTENSIONS))
        beside = scan_model_files(self.ckpt_dir, lambda n: n.endswith(BESIDE_CHECKPOINT_SUFFIXES))
        infos: list[VaeInfo] = []
        names: set[str] = set()
        seen_files: set[str] = set()
        for root, paths in ((self.vae_dir, in_vae_dir), (self.ckpt_dir, beside)):
            for path in paths:
                real = os.path.realpath(path)
                if real in seen_files:
                    continue  # same file reachable from both folders (e.g. ckpt dir inside VAE dir)
                seen_files.add(real)
                name = path.name
                if name in names:
                    name = path.relative_to(root).as_posix()
                names.add(name)
                infos.append(VaeInfo(filename=os.path.abspath(path), name=name))
        with self._lock:
            self._infos = infos
        return list(infos)

    def list(self) -> list[VaeInfo]:
        with self._lock:
            return list(self._infos)

    def names(self) -> list[str]:
        return [info.name for info in self.list()]

    def choices(self) -> list[str]:
        """Values for the settings dropdown, A1111 order."""
        return [AUTOMATIC, NONE, *self.names()]

    def find(self, name: str) -> VaeInfo | None:
        """Exact name, then exact absolute filename, then a unique case-insensitive name or stem."""
        infos = self.list()
        for info in infos:
            if info.name == name or info.filename == name:
                return info
        folded = name.casefold()
        matches = [i for i in infos if i.name.casefold() == folded or i.stem.casefold() == folded]
        return matches[0] if len(matches) == 1 else None

    def resolve(self, setting: str | None, checkpoint_filename: str | None, *,
                strict: bool = True) -> VaeInfo | None:
        """The VAE to use, or None for the checkpoint's baked-in VAE. See the module docstring."""
        setting = (setting or "").strip() or AUTOMATIC
        if setting == NONE:
            return None
        if setting != AUTOMATIC:
            found = self.find(setting)
            if found is not None:
                return found
            if strict:
                raise UnknownVaeError(setting, self.names())
            log.warning("VAE %r not found; using %s instead", setting, AUTOMATIC)
        return self.automatic_for(checkpoint_filename)

    def automatic_for(self, checkpoint_filename: str | None) -> VaeInfo | None:
        if not checkpoint_filename:
            return None
        ckpt = Path(os.path.abspath(checkpoint_filename))
        stem = _checkpoint_stem(str(ckpt))
        # Beside the checkpoint: checked on disk so it works even before a refresh.
        for suffix in BESIDE_CHECKPOINT_SUFFIXES:
            candidate = ckpt.with_name(stem + suffix)
            if candidate.is_file():
                known = next((i for i in self.list() if i.filename == str(candidate)), None)
                return known or VaeInfo(filename=str(candidate), name=candidate.name)

        in_dir = [i for i in self.list() if _is_within(i.filename, self.vae_dir)]
        folded = stem.casefold()
        for pred in (lambda s: s == folded, lambda s: s == folded + ".vae", lambda s: s.startswith(folded)):
            for info in in_dir:
                if pred(info.stem.casefold()):
                    return info
        return None

    def shorthash(self, info: VaeInfo) -> str | None:
        """First 10 hex of the VAE's sha256 for the infotext ``VAE hash`` field (None without a cache)."""
        if self.hash_cache is None:
            return None
        return self.hash_cache.sha256(info.filename, f"vae/{info.name}")[:10]


def _is_within(filename: str, directory: Path) -> bool:
    try:
        Path(filename).relative_to(directory)
        return True
    except ValueError:
        return False
