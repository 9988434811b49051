"""The extra networks a job may use (LoRA/LyCORIS, hypernetworks): registries and the engine that
merges them, built on first use so that starting the server imports no torch."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from modules.core.extension_networks import ExtensionNetworks
from modules.core.paths import AppPaths


def lora_roots(paths: AppPaths) -> list[Path]:
    """``models/Lora`` (or ``--lora-dir``) and ``models/LyCORIS``, as A1111 scans them."""
    return [paths.lora_dir, paths.models_dir / "LyCORIS"]


def hypernetwork_roots(paths: AppPaths) -> list[Path]:
    return [paths.hypernetwork_dir]


class ExtraNetworksService:
    def __init__(self, lora_dirs: list[Path], hypernetwork_dirs: list[Path]):
        self.lora_dirs, self.hypernetwork_dirs = list(lora_dirs), list(hypernetwork_dirs)
        self._engine: Any = None
        self._lock = threading.Lock()
        self._registry: Any = None          # models.lora_registry.LoraRegistry (torch-free), shared with the engine
        self._registry_lock = threading.Lock()
        self.handlers = ExtensionNetworks()   # extra-network types extensions register (A1111's registry)

    @classmethod
    def from_paths(cls, paths: AppPaths) -> "ExtraNetworksService":
        return cls(lora_roots(paths), hypernetwork_roots(paths))

    @property
    def engine(self) -> Any:
        """engine.networks.activation.ExtraNetworks (imports torch)."""
        with self._lock:
            if self._engine is None:
                from modules.engine.networks.activation import ExtraNetworks
                from modules.engine.networks.hypernetwork import Hypernetworks

                self._engine = ExtraNetworks(self.lora_registry, Hypernetworks(self.hypernetwork_dirs))
            return self._engine

    @property
    def lora_registry(self) -> Any:
        """The LoRA files, without building the engine (no torch): for the settings' choices."""
        with self._registry_lock:
            if self._registry is None:
                from modules.models.lora_registry import LoraRegistry

                self._registry = LoraRegistry(self.lora_dirs)
            return self._registry

    @property
    def hypernetwork_files(self) -> Any:
        """The hypernetwork files, without building the engine (no torch): for the settings' choices."""
        from modules.models.hypernetwork_files import HypernetworkFiles

        return HypernetworkFiles(self.hypernetwork_dirs)

    def _setting_registries(self) -> list[tuple[Any, Any]]:
        from modules.core import network_settings

        registries = {"sd_hypernetwork": self.hypernetwork_files, "sd_lora": self.lora_registry}
        return [(setting, registries[setting.key]) for setting in network_settings.SETTINGS]

    def bind_settings(self, options: Any) -> None:
        """``sd_hypernetwork``/``sd_lora`` become dropdowns of the files (core/network_settings.py)."""
        for setting, registry in self._setting_registries():
            setting.bind(options, registry)

    def add_setting_networks(self, prompts: list[str], options: Any) -> list[str]:
        """A1111's ``sd_hypernetwork``/``sd_lora`` settings: their tags appended to `prompts` (in place);
        warnings."""
        warnings: list[str] = []
        for setting, registry in self._setting_registries():
            warnings += setting.add_to_prompts(prompts, registry, options)
        return warnings

    @property
    def loras(self) -> Any:
        return self.engine.loras

    @property
    def hypernetworks(self) -> Any:
        return self.engine.hypernetworks

    def activate(self, model: Any, encoder: Any, prompts: list[str], *, options: Any = None,
                 disabled: bool = False) -> Any:
        prompts = self.handlers.strip(prompts)   # extension networks' tags are theirs (activate_extensions)
        return self.engine.activate(model, encoder, prompts, options=options, disabled=disabled)

    def activate_extensions(self, p: Any, prompts: list[str], *, hires: bool = False) -> None:
        """The networks extensions registered: activate(p, params) for the first prompt's tags, else []."""
        self.handlers.activate(p, prompts, hires=hires)

    def deactivate_extensions(self, p: Any, prompts: list[str]) -> None:
        self.handlers.deactivate(p, prompts)
