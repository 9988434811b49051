"""A1111 hypernetwork files (``models/hypernetworks``, ``--hypernetwork-dir``, recursive ``.pt``).

Torch-free, so the settings' choices list them without loading the engine; the engine's
``Hypernetworks`` (engine/networks/hypernetwork.py) adds loading and hooking on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from modules.models.network_files import NetworkFile, scan_network_files

HYPERNETWORK_EXTENSIONS = (".pt",)


class HypernetworkFiles:
    """The hypernetwork files under the roots, scanned afresh on every listing (there is no cache)."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = [Path(r) for r in roots]

    def list(self) -> list[NetworkFile]:
        return scan_network_files(self.roots, HYPERNETWORK_EXTENSIONS)

    def find(self, name: str) -> NetworkFile | None:
        """``<hypernet:name>``: the file stem, exactly, else ignoring case."""
        files = self.list()
        return next((f for f in files if f.name == name), None) or next(
            (f for f in files if f.name.lower() == name.lower()), None)

    def refresh(self) -> None:
        """Nothing to do: every listing rescans. (Settings' refresh button calls it, as for LoRAs.)"""
