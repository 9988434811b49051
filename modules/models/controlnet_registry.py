"""The ControlNet models on disk (``models/ControlNet``, ``extensions/sd-webui-controlnet/models``,
``--controlnet-dir``), their names as the extension lists them (``name [hash]``), and a small cache
of loaded ones.

The hash is the one sd-webui-controlnet shows: the first 8 hex digits of the sha256 of the 64 KiB
at offset 1 MiB (A1111's old "model hash"), cheap enough to compute for every file at listing time.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from modules.models.checkpoints import scan_model_files

log = logging.getLogger(__name__)

EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
CACHE_SIZE = 2
SKIPPED_DIR = "annotators"   # models/ControlNet/annotators/: the preprocessors' estimator folders, not ControlNets   # loaded ControlNets kept (sd-webui-controlnet's default model cache size)

__all__ = ["ControlNetFile", "ControlNetRegistry", "UnknownControlNetError", "short_model_hash"]


class UnknownControlNetError(LookupError):
    """The unit names a model that is not in the ControlNet folders."""


def short_model_hash(path: Path) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        digest.update(f.read(0x10000))
    return digest.hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetFile:
    path: Path
    name: str          # the file stem
    shorthash: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"


class ControlNetRegistry:
    def __init__(self, roots: Iterable[Path]):
        self.roots = [Path(r) for r in roots]
        self._files: list[ControlNetFile] = []
        self._hashes: dict[tuple[Path, float], str] = {}
        self._loaded: OrderedDict[tuple[Path, float, str, str], tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.RLock()

    def refresh(self) -> list[ControlNetFile]:
        found, seen = [], set()
        # (scan_model_files, not network_files: that one reads weights metadata and pulls torch in at startup)
        paths = [p for r in self.roots if r.is_dir() for p in scan_model_files(r, lambda n: n.endswith(EXTENSIONS))
                 if SKIPPED_DIR not in p.relative_to(r).parts[:-1]]
        for path in paths:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                key = (path.resolve(), path.stat().st_mtime)
                if key not in self._hashes:
                    self._hashes[key] = short_model_hash(path)
            except OSError as exc:
                log.warning("Skipping ControlNet model %s: %s", path, exc)
                continue
            # a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) is named by its folder
            name = path.parent.name if path.stem.startswith("diffusion_pytorch_model") else path.stem
            found.append(ControlNetFile(path=path, name=name, shorthash=self._hashes[key]))
        with self._lock:
            self._files = found
        return found

    def files(self) -> list[ControlNetFile]:
        with self._lock:
            return list(self._files)

    def titles(self) -> list[str]:
        return [f.title for f in self.files()]

    def titles_refreshed(self) -> list[str]:
        self.refresh()
        return self.titles()

    def find(self, name: str) -> ControlNetFile:
        """By title (``name [hash]``), name, hash, or file name; refreshes once when not found."""
        for attempt in (0, 1):
            found = self._match(str(name).strip())
            if found is not None:
                return found
            if attempt == 0:
                self.refresh()
        raise UnknownControlNetError(f"ControlNet model {name!r} not found in {', '.join(map(str, self.roots))}; "
                                     f"available: {', '.join(self.titles()) or 'none'}")

    def _match(self, wanted: str) -> ControlNetFile | None:
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        tag = wanted.rsplit(" [", 1)[1][:-1] if wanted.endswith("]") and " [" in wanted else None
        files = self.files()
        for f in files:
            if f.title == wanted:
                return f
        for f in files:
            if f.name == bare and (tag is None or tag == f.shorthash) or f.path.name == wanted:
                return f
        return next((f for f in files if f.name == bare or f.shorthash == (tag or wanted)), None)

    def load(self, name: str, device: Any, dtype: Any, base_unet: Any = None) -> tuple[ControlNetFile, Any, Any]:
        """(file, model, ControlNetSpec) for `name`, from the cache when loaded before. `base_unet`: the
        checkpoint's UNet (a control-LoRA is built on it, so its cache entry is per UNet)."""
        from modules.models.controlnet import load_controlnet

        file = self.find(name)
        key = (file.path.resolve(), file.path.stat().st_mtime, str(device), str(dtype))
        with self._lock:
            cached = self._loaded.get(key)
            if cached is not None and (cached[1].kind != "control_lora" or cached[2]() is base_unet):
                self._loaded.move_to_end(key)
                return file, cached[0], cached[1]
            model, spec = load_controlnet(file.path, device, dtype, base_unet)
            self._loaded[key] = (model, spec, weakref.ref(base_unet) if base_unet is not None else (lambda: None))
            while len(self._loaded) > CACHE_SIZE:
                self._loaded.popitem(last=False)
            return file, model, spec
