"""Monocular depth estimation from local transformers folders: DPT/MiDaS and Depth Anything (V1/V2).

One estimator serves the ControlNet depth preprocessors and SD2 depth checkpoints (depth2img). A
model is a folder holding ``config.json`` and ``model.safetensors`` (as ``save_pretrained`` writes
it, e.g. a copy of Intel/dpt-hybrid-midas or depth-anything/Depth-Anything-V2-Small-hf) under
``models/depth/<name>/`` or ``models/ControlNet/annotators/<name>/``. It is loaded with transformers'
``AutoModelForDepthEstimation`` from that path only (``local_files_only``, safetensors only, no
remote code): nothing is ever downloaded.

The map returned is relative *nearness* (larger = closer), as MiDaS and Depth Anything predict it,
at the input image's size. torch and transformers are imported only when a model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

INSTALL_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SEARCH_SUBDIRS = ("depth", "ControlNet/annotators")
WEIGHT_FILE = "model.safetensors"
# transformers model_type -> family; only these are estimators we know how to read.
KNOWN_TYPES = {"dpt": "midas", "depth_anything": "depth_anything"}
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_RESULT_CACHE = 4


class DepthModelMissingError(RuntimeError):
    """No usable estimator folder; the message says which files go where."""


@dataclass(frozen=True)
class DepthFolder:
    name: str
    path: Path
    model_type: str       # transformers model_type from config.json

    @property
    def family(self) -> str:
        return KNOWN_TYPES[self.model_type]

    @property
    def is_v2(self) -> bool:
        return "v2" in self.name.lower()


def _has_weights(folder: Path) -> bool:
    return (folder / WEIGHT_FILE).is_file() or (folder / f"{WEIGHT_FILE}.index.json").is_file()


def read_folder(folder: Path) -> DepthFolder | None:
    """The folder as an estimator, or None when it lacks config.json/weights or is of an unknown type."""
    config = folder / "config.json"
    if not config.is_file() or not _has_weights(folder) or config.stat().st_size > 1_000_000:
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return None
    return DepthFolder(folder.name, folder, model_type) if model_type in KNOWN_TYPES else None


class DepthEstimators:
    """The estimator folders under the search roots; loads one model lazily and keeps only one.

    Thread-safe: one lock around loading and inference (jobs and /controlnet/detect may overlap).
    """

    def __init__(self, roots: Sequence[Path], device: str | None = None):
        self.roots = [Path(r) for r in roots]
        self.device = device          # None: CUDA when available, else CPU (decided at load time)
        self._lock = threading.RLock()
        self._loaded: tuple[Path, Any, Any] | None = None    # (folder, model, image processor)
        self._results: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def for_models_dir(cls, models_dir: Path, device: str | None = None) -> "DepthEstimators":
        return cls([Path(models_dir) / sub for sub in SEARCH_SUBDIRS], device=device)

    # ------------------------------------------------------------------ finding

    def folders(self) -> list[DepthFolder]:
        found = []
        for root in self.roots:
            if root.is_dir():
                found += [f for f in (read_folder(d) for d in sorted(root.iterdir()) if d.is_dir()) if f]
        return found

    def find(self, family: str | None = None, prefer_v2: bool | None = None) -> DepthFolder | None:
        """The first folder of `family` ("midas", "depth_anything"; None: any, MiDaS first as SD2
        depth was trained on it), preferring V2 (or not) by the folder name when asked."""
        folders = [f for f in self.folders() if family is None or f.family == family]
        if family is None:
            folders.sort(key=lambda f: f.family != "midas")
        if prefer_v2 is not None:
            folders.sort(key=lambda f: f.is_v2 != prefer_v2)
        return folders[0] if folders else None

    def missing_message(self, family: str | None = None, example: str = "dpt-hybrid-midas") -> str:
        kind = {"midas": "DPT/MiDaS ", "depth_anything": "Depth Anything "}.get(family or "", "")
        source = "depth-anything/Depth-Anything-V2-Small-hf" if family == "depth_anything" else "Intel/dpt-hybrid-midas"
        where = " or ".join(f"{r / example}/" for r in self.roots)
        return (f"no {kind}depth estimator found: put the config.json and {WEIGHT_FILE} of a transformers "
                f"depth-estimation model (e.g. {source}) in {where}")

    def require(self, family: str | None = None, prefer_v2: bool | None = None, example: str = "dpt-hybrid-midas"
                ) -> DepthFolder:
        folder = self.find(family, prefer_v2)
        if folder is None:
            raise DepthModelMissingError(self.missing_message(family, example))
        return folder

    # ------------------------------------------------------------------ running

    def estimate(self, image: Image.Image, folder: DepthFolder | None = None) -> np.ndarray:
        """float32 [H, W] nearness map of `image`, at its size (bicubic from the model's output).
        The model sees the image as its processor prepares it (DPT: 384x384; transformers' DPT takes
        no other size, where the ControlNet extension's own MiDaS runs at the image's size)."""
        return self._run(image, folder, (image.height, image.width))

    def estimate_raw(self, image: Image.Image, folder: DepthFolder | None = None) -> np.ndarray:
        """The model's own prediction at its processor's resolution (what diffusers' depth2img resizes)."""
        return self._run(image, folder, None)

    def _run(self, image: Image.Image, folder: DepthFolder | None, size: tuple[int, int] | None) -> np.ndarray:
        folder = folder or self.require()
        rgb = image.convert("RGB")
        key = (str(folder.path), rgb.size, size, hashlib.sha1(rgb.tobytes()).hexdigest())
        with self._lock:
            cached = self._results.get(key)
            if cached is not None:
                self._results.move_to_end(key)
                return cached.copy()
            model, processor = self._model(folder)
            depth = _predict(model, processor, rgb, size)
            self._results[key] = depth
            while len(self._results) > _RESULT_CACHE:
                self._results.popitem(last=False)
            return depth.copy()

    def unload(self) -> None:
        """Free the loaded model (and its device memory)."""
        with self._lock:
            self._loaded = None
            self._results.clear()
        _empty_device_cache()

    def _model(self, folder: DepthFolder) -> tuple[Any, Any]:
        if self._loaded is not None and self._loaded[0] == folder.path:
            return self._loaded[1], self._loaded[2]
        self.unload()  # one estimator at a time: free the previous before loading the next
        model, processor = load_estimator(folder, self.device)
        self._loaded = (folder.path, model, processor)
        return model, processor


def load_estimator(folder: DepthFolder, device: str | None = None) -> tuple[Any, Any]:
    """(model, image processor) from a local folder; never the hub, never pickles, never remote code."""
    import torch
    from transformers import AutoModelForDepthEstimation

    try:
        model = AutoModelForDepthEstimation.from_pretrained(
            str(folder.path), local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=torch.float32)  # DPT-Hybrid's batch norms are not fp16-safe; these models are small
    except Exception as exc:  # a damaged or hostile folder is a clear error, never a crash
        raise DepthModelMissingError(f"depth estimator {folder.path} could not be loaded: {exc}") from exc
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval(), _image_processor(folder, getattr(model.config, "image_size", 384))


def _image_processor(folder: DepthFolder, dpt_size: int) -> Any:
    """The folder's own preprocessor_config.json, else the published defaults of its family.
    The PIL processor: the default one needs torchvision, which this project does not install."""
    from transformers import DPTImageProcessorPil

    if (folder.path / "preprocessor_config.json").is_file():
        return DPTImageProcessorPil.from_pretrained(str(folder.path), local_files_only=True)
    if folder.family == "depth_anything":
        return DPTImageProcessorPil(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                    resample=Image.Resampling.BICUBIC, image_mean=_IMAGENET[0],
                                    image_std=_IMAGENET[1])
    size = dpt_size if isinstance(dpt_size, int) else 384  # DPT-Hybrid only takes its configured size
    return DPTImageProcessorPil(size={"height": size, "width": size}, keep_aspect_ratio=False,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _predict(model: Any, processor: Any, image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        depth = model(pixel_values=pixels).predicted_depth[:, None].float()
        if size is not None:
            depth = F.interpolate(depth, size=size, mode="bicubic", align_corners=False)
    return depth[0, 0].cpu().numpy().astype(np.float32)


def _empty_device_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # nothing to free if torch was never imported
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_grey_map(depth: np.ndarray) -> Image.Image:
    """The ControlNet depth map: min-max normalised to 0..255, near = white, as RGB."""
    lo, hi = float(depth.min()), float(depth.max())
    scaled = (depth - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(depth)
    return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), "L").convert("RGB")


# ---------------------------------------------------------------- the process-wide instance

_default: DepthEstimators | None = None


def default_estimators() -> DepthEstimators:
    """The estimator the ControlNet preprocessor registry uses (its callables take no context).
    services.py sets it from --models-dir/--data-dir; before that, the install's models/ folder."""
    global _default
    if _default is None:
        _default = DepthEstimators.for_models_dir(INSTALL_MODELS_DIR)
    return _default


def set_default_estimators(estimators: DepthEstimators) -> None:
    global _default
    _default = estimators
