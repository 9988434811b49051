"""Which checkpoint is selected, and getting it loaded (lazily, never at startup).

Glue between the registry (files), the settings (`sd_model_checkpoint`,
`sd_vae`) and the ModelManager (memory). No gradio, no torch at import.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from modules.models.checkpoints import CheckpointInfo, CheckpointRegistry
from modules.core.options import Options
from modules.models.vae import VaeRegistry

log = logging.getLogger(__name__)


class NoCheckpointError(RuntimeError):
    """No checkpoint to load; the message tells the user where to put one."""


class UnknownCheckpointError(LookupError):
    pass


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded (truncated, not SD, mismatched yaml, unsafe pickle).
    The message names the file and the cause; the previous model stays loaded."""


class ModelService:
    def __init__(self, *, registry: CheckpointRegistry, vaes: VaeRegistry, options: Options,
                 manager_factory: Callable[[], Any], preferred: Path | None = None, vae_override: Path | None = None):
        self.registry = registry
        self.vaes = vaes
        self.options = options
        self.preferred = preferred          # --ckpt
        self.vae_override = vae_override    # --vae-path
        self._manager_factory = manager_factory
        self._manager = None
        self._lock = threading.Lock()
        self._loaded_listeners: list[Callable[[Any], None]] = []

    @property
    def manager(self):
        """The ModelManager; built on first use so torch is imported only when a model is needed."""
        with self._lock:
            if self._manager is None:
                self._manager = self._manager_factory()
                self._manager.add_loaded_listener(
                    lambda model: log.info("Model %s loaded in %.1fs (%s).", model.title, model.load_seconds,
                                           model.policy.describe()))
                for fn in self._loaded_listeners:
                    self._manager.add_loaded_listener(fn)
            return self._manager

    def add_loaded_listener(self, fn: Callable[[Any], None]) -> None:
        """fn(model) after each model load; kept until the manager exists, so torch stays unimported."""
        with self._lock:
            self._loaded_listeners.append(fn)
            if self._manager is not None:
                self._manager.add_loaded_listener(fn)

    @property
    def loaded_model(self):
        return None if self._manager is None else self._manager.current

    # -- listing ---------------------------------------------------------------------------
    def refresh(self) -> None:
        self.registry.refresh()
        self.vaes.refresh()

    def titles(self) -> list[str]:
        return self.registry.titles()

    def vae_choices(self) -> list[str]:
        return ["Automatic", "None", *self.vaes.names()]

    # -- selection -------------------------------------------------------------------------
    def selected_info(self, options: Any = None) -> CheckpointInfo:
        """The checkpoint named in settings (a job's snapshot, else the live ones), else --ckpt, else
        the first one found."""
        wanted = (options or self.options).sd_model_checkpoint
        if wanted:
            info = self.registry.get_closest(wanted)
            if info is not None:
                return info
            log.warning("Checkpoint %r from settings was not found; using another one.", wanted)
        if self.preferred is not None:
            info = self.registry.get_closest(str(self.preferred)) or self.registry.get_closest(self.preferred.name)
            if info is not None:
                return info
        found = self.registry.list()
        if not found:
            raise NoCheckpointError(self.registry.empty_message())
        return found[0]

    def vae_file_for(self, info: CheckpointInfo, options: Any = None) -> Path | None:
        if self.vae_override is not None:
            return self.vae_override
        vae = self.vaes.resolve((options or self.options).sd_vae, info.filename, strict=False)
        return Path(vae.filename) if vae is not None else None

    def select(self, title: str, *, load: bool = True):
        """Make `title` the selected checkpoint (saved in settings) and load it.

        On a failed load the previous model stays loaded and the setting is not changed.
        """
        info = self.registry.get_closest(title)
        if info is None:
            raise UnknownCheckpointError(f"checkpoint {title!r} not found; known: {', '.join(self.titles()) or 'none'}")
        model = self._load(info) if load else None
        if self.options.set("sd_model_checkpoint", info.title):
            self.options.save()
        return model

    def current(self, options: Any = None):
        """The loaded model for the checkpoint and VAE the settings select, loading it if needed."""
        return self._load(self.selected_info(options), options)

    def load(self, info: CheckpointInfo, options: Any = None):
        """Load `info` (or take it from the cache) with the VAE `options` select, without selecting it in
        the settings (the refiner: A1111's SkipWritingToConfig)."""
        return self._load(info, options)

    def _load(self, info: CheckpointInfo, options: Any = None):
        if self.registry.hashing:
            try:
                self.registry.calculate_shorthash(info)
            except OSError as err:
                log.warning("Could not hash %s: %s", info.filename, err)
        from modules.models.detection import ModelConfigMismatchError  # torch is loaded by now anyway
        from modules.models.weights_io import CheckpointLoadError

        try:
            return self.manager.get(info, self.vae_file_for(info, options))
        except (CheckpointLoadError, ModelConfigMismatchError, OSError) as err:
            raise ModelLoadError(str(err)) from err

    def unload(self) -> None:
        if self._manager is not None:
            self._manager.unload_all()
