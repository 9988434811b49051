"""Extra-network files on disk: one recursive scan, the preview image and the user-metadata file beside each.

LoRA, textual-inversion, hypernetwork and checkpoint registries all list their files through
``scan_network_files``, so the Extra Networks browser and the API see the same names, previews and
``name.json`` notes (A1111's layout: ``name.preview.png`` or ``name.png`` and ``name.json`` next to the file).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from modules.core.atomic import atomic_write_json
from modules.models.checkpoints import scan_model_files

log = logging.getLogger(__name__)

PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp", ".gif", ".preview.jpg", ".preview.webp")
MAX_USER_METADATA_BYTES = 1 << 20  # a hand-edited notes file; anything larger is not ours
USER_METADATA_KEYS = ("description", "activation text", "preferred weight", "negative text", "notes", "sd version")


@dataclass(frozen=True)
class NetworkFile:
    """One model file found under one of a registry's roots."""
    path: Path
    root: Path

    @property
    def name(self) -> str:
        """The file stem: what ``<lora:name>`` and the card title use."""
        return self.path.stem

    @property
    def relpath(self) -> str:
        return self.path.relative_to(self.root).as_posix()

    @property
    def base(self) -> Path:
        """The path without its extension; previews and notes are named after it."""
        return self.path.with_suffix("")

    def preview(self) -> Path | None:
        for suffix in PREVIEW_SUFFIXES:
            candidate = self.base.with_name(self.base.name + suffix)
            if candidate != self.path and candidate.is_file():
                return candidate
        return None

    @property
    def user_metadata_path(self) -> Path:
        return self.base.with_name(self.base.name + ".json")

    def user_metadata(self) -> dict[str, Any]:
        """The user's notes (``name.json``); an unreadable or oversized file reads as empty, with a warning."""
        path = self.user_metadata_path
        try:
            if not path.is_file():
                return {}
            if path.stat().st_size > MAX_USER_METADATA_BYTES:
                log.warning("Ignoring %s: larger than %d bytes", path, MAX_USER_METADATA_BYTES)
                return {}
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("Ignoring unreadable %s: %s", path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save_user_metadata(self, data: dict[str, Any]) -> None:
        """Write ``name.json`` atomically (the user asked for it, so it replaces the old notes)."""
        encoded = json.dumps(data, ensure_ascii=False)
        if len(encoded.encode("utf-8")) > MAX_USER_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_USER_METADATA_BYTES} bytes")
        atomic_write_json(self.user_metadata_path, data)

    def training_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` map (kohya ``ss_*`` fields); empty for other formats or bad files."""
        if self.path.suffix.lower() != ".safetensors":
            return {}
        from modules.models import weights_io  # imports torch: only when metadata is read, never to list files

        try:
            return weights_io.read_safetensors_metadata(self.path)
        except weights_io.CheckpointLoadError as exc:
            log.warning("%s", exc)
            return {}


def scan_network_files(roots: Iterable[Path], extensions: tuple[str, ...]) -> list[NetworkFile]:
    """Every file under ``roots`` (recursive, natural order per root) whose name ends with one of ``extensions``.

    A file reachable from two roots (overlapping folders, symlinks) is listed once, under the first root.
    """
    lowered = tuple(e.lower() for e in extensions)
    seen: set[Path] = set()
    found: list[NetworkFile] = []
    for root in roots:
        root = Path(root)
        for path in scan_model_files(root, lambda name: name.endswith(lowered)):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(NetworkFile(path=path, root=root))
    return found
