"""Upscaler model files: A1111's folders, names, and spandrel detection; loaded lazily, cached.

Listing is torch-free (file names only), so dropdowns fill at startup. Detection (architecture, scale)
loads the file through `weights_io` (safetensors, or torch.load(weights_only=True)) and hands the
state dict to spandrel's ModelLoader (`spandrel_support`); spandrel never opens a file itself. A file
that cannot be read or identified is reported unusable with the reason and never breaks a scan.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

# A1111's upscaler folders under models/, in its listing order.
UPSCALER_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "ScuNET", "HAT", "upscalers")
MODEL_EXTENSIONS = (".pth", ".pt", ".safetensors", ".ckpt")
MAX_FILES = 2000   # a folder with more is truncated (logged), so a scan stays bounded


class UnknownUpscalerError(LookupError):
    """No upscaler by that name; the message lists the valid names."""


class UpscalerLoadError(RuntimeError):
    """The file exists but cannot be used (unreadable, refused, or not a model spandrel knows)."""


@dataclass(frozen=True)
class UpscalerFile:
    name: str        # A1111's name: the file stem ("4x-UltraSharp")
    path: Path
    folder: str      # which kind of folder it came from ("ESRGAN", ...)


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    path: Path
    usable: bool
    architecture: str = ""
    scale: int = 0
    purpose: str = ""    # spandrel's purpose: "SR", "FaceSR", "Restoration", ...
    reason: str = ""     # why not usable


def scan_folders(folders: Iterable[tuple[str, Path]]) -> list[UpscalerFile]:
    """Model files under each folder (recursive, sorted), named by stem; a stem seen twice gets its folder."""
    out: list[UpscalerFile] = []
    taken: set[str] = set()
    for kind, folder in folders:
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MODEL_EXTENSIONS and p.is_file())
        if len(files) > MAX_FILES:
            log.warning("%s: %d model files; only the first %d are listed", folder, len(files), MAX_FILES)
            files = files[:MAX_FILES]
        for path in files:
            name = path.stem if path.stem not in taken else f"{path.stem} ({kind}/{path.relative_to(folder)})"
            taken.add(name)
            out.append(UpscalerFile(name=name, path=path, folder=kind))
    return out


def guess_scale(name: str) -> int:
    """The scale an A1111 name promises ("4x-UltraSharp", "RealESRGAN_x2plus"), 4 when it says none."""
    match = re.search(r"(?:^|[^0-9])([1-8])x|x([1-8])(?:[^0-9]|$)", name, re.IGNORECASE)
    return int(match.group(1) or match.group(2)) if match else 4


def read_model(path: Path) -> Any:
    """A spandrel ModelDescriptor for `path`, on the CPU in eval mode. Raises UpscalerLoadError."""
    from modules.models import weights_io
    from modules.models.spandrel_support import spandrel_support

    support = spandrel_support()
    try:
        state_dict = weights_io.load_nested_weights(path)
    except weights_io.CheckpointLoadError as err:
        raise UpscalerLoadError(str(err)) from None
    try:
        model = support.model_loader().load_from_state_dict(state_dict)
    except support.spandrel.UnsupportedModelError:
        raise UpscalerLoadError(f"{path.name}: spandrel does not recognise this model's architecture") from None
    except Exception as err:  # a known key layout with shapes that do not fit
        raise UpscalerLoadError(f"{path.name}: not a usable model ({type(err).__name__}: {err})") from None
    return model.eval()


class UpscalerRegistry:
    """The upscaler files of the configured folders, their detection results and a small model cache.

    `cache_limit` models stay loaded (on the CPU) after use; the least recently used goes first.
    """

    def __init__(self, folders: list[tuple[str, Path]], *, cache_limit: int = 1,
                 reader: Callable[[Path], Any] = read_model):
        self.folders = folders
        self.cache_limit = max(0, cache_limit)
        self._reader = reader
        self._files: list[UpscalerFile] = []
        self._probed: dict[tuple[Path, int, int], UpscalerInfo] = {}
        self._cache: OrderedDict[tuple[Path, int, int], Any] = OrderedDict()
        self._lock = threading.RLock()
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            self._files = scan_folders(self.folders)

    def files(self) -> list[UpscalerFile]:
        return list(self._files)

    def names(self) -> list[str]:
        return [f.name for f in self._files]

    def find(self, name: str) -> UpscalerFile | None:
        return next((f for f in self._files if f.name == name), None)

    def get(self, name: str) -> UpscalerFile:
        found = self.find(name)
        if found is None:
            raise UnknownUpscalerError(f"upscaler {name!r} not found; available: {', '.join(self.names()) or '(none)'}")
        return found

    @staticmethod
    def _key(path: Path) -> tuple[Path, int, int]:
        st = path.stat()
        return (path, st.st_mtime_ns, st.st_size)

    def probe(self, name: str) -> UpscalerInfo:
        """Detect the file's architecture and scale (cached per file version); never raises for a bad file."""
        file = self.get(name)
        try:
            key = self._key(file.path)
        except OSError as err:
            return UpscalerInfo(name, file.path, False, reason=f"cannot read the file: {err}")
        with self._lock:
            if key not in self._probed:
                try:
                    model = self._load(key)
                    self._probed[key] = UpscalerInfo(name, file.path, True, str(model.architecture.id),
                                                     int(model.scale), str(model.purpose))
                except UpscalerLoadError as err:
                    log.warning("upscaler %s: %s", name, err)
                    self._probed[key] = UpscalerInfo(name, file.path, False, reason=str(err))
            return self._probed[key]

    def infos(self) -> list[UpscalerInfo]:
        return [self.probe(f.name) for f in self._files]

    def load(self, name: str) -> Any:
        """The loaded model for `name` (from the cache when it is there). Raises UpscalerLoadError."""
        file = self.get(name)
        with self._lock:
            return self._load(self._key(file.path))

    def _load(self, key: tuple[Path, int, int]) -> Any:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        model = self._reader(key[0])
        if self.cache_limit:
            self._cache[key] = model
            while len(self._cache) > self.cache_limit:
                self._cache.popitem(last=False)
        return model

    def unload_all(self) -> None:
        with self._lock:
            self._cache.clear()


def upscaler_folders(models_dir: Path, opts: Any = None) -> list[tuple[str, Path]]:
    """(kind, folder) for each of A1111's upscaler folders; `--<kind>-models-path` moves one."""
    out = []
    for kind in UPSCALER_FOLDERS:
        flag = getattr(opts, f"{kind.lower()}_models_path", None) if opts is not None else None
        out.append((kind, Path(flag).expanduser().resolve() if flag else models_dir / kind))
    return out
