"""A1111's Extras: upscale (two blended upscalers), restore faces, save to outputs/extras-images.

One typed request (`ExtrasParams`) for the UI tab and `/sdapi/v1/extra-*`; every run is one queued job
on the generation queue, with per-tile progress and interrupt between tiles. Images are saved by
`saving.save_image` (atomic, numbered `NNNNN.png`), keeping the source's PNG info and adding A1111's
"Postprocess ..." lines in the `extras` chunk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from modules.core.limits import LimitError, Limits
from modules.core.pipeline import ProcessingError
from modules.engine.upscaling import image_upscaler_names, is_image_upscaler, resize_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class ExtrasParams:
    """A1111's extras fields, with its API names."""
    resize_mode: int = 0               # 0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscale_first: bool = False

    def validate(self) -> None:
        """Unknown upscaler names are a ProcessingError (422) listing the valid names."""
        for field_name in ("upscaler_1", "upscaler_2"):
            name = getattr(self, field_name)
            if not is_image_upscaler(name):
                raise ProcessingError(f"{field_name}: upscaler {name!r} not found; available: "
                                      f"{', '.join(image_upscaler_names())}")
        if self.resize_mode not in (0, 1):
            raise ProcessingError(f"resize_mode: must be 0 (scale by) or 1 (scale to), got {self.resize_mode}")
        if not 1 <= self.upscaling_resize <= 8:
            raise ProcessingError(f"upscaling_resize: must be 1-8, got {self.upscaling_resize}")
        for name in ("extras_upscaler_2_visibility", "gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ProcessingError(f"{name}: must be 0-1, got {getattr(self, name)}")

    @property
    def upscales(self) -> bool:
        return self.upscaler_1 != "None"   # as A1111's API: upscaler 2 only blends into upscaler 1's result

    def scale_for(self, size: tuple[int, int]) -> float:
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / size[0], self.upscaling_resize_h / size[1])
        return self.upscaling_resize

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        scale = self.scale_for(size)
        target = (int(size[0] * scale), int(size[1] * scale))
        if self.resize_mode == 1:
            return max(target[0], self.upscaling_resize_w), max(target[1], self.upscaling_resize_h)
        return max(8, target[0] // 8 * 8), max(8, target[1] // 8 * 8)   # A1111 rounds "scale by" to 8

    def check_target(self, size: tuple[int, int], limits: Limits) -> None:
        if self.upscales:
            limits.check_pixels("upscale target (upscaling_resize, upscaling_resize_w/h)", *self.target_size(size))


# (image, target size, upscaler name) -> upscaled image
UpscaleFn = Callable[[Image.Image, tuple[int, int], str], Image.Image]
# (image, params) -> (image, info fields): the face-restoration step, or None where none is set up
RestoreFn = Callable[[Image.Image, ExtrasParams], tuple[Image.Image, dict[str, Any]]]


def upscale_step(image: Image.Image, params: ExtrasParams, upscale: UpscaleFn) -> tuple[Image.Image, dict[str, Any]]:
    """Upscaler 1 (and upscaler 2 blended in at its visibility), then the optional centre crop."""
    info: dict[str, Any] = {}
    if not params.upscales:
        return image, info
    if params.resize_mode == 1:
        info["Postprocess upscale to"] = f"{params.upscaling_resize_w}x{params.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = params.upscaling_resize
    target = params.target_size(image.size)
    first = upscale(image, target, params.upscaler_1)
    info["Postprocess upscaler"] = params.upscaler_1
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        second = upscale(image, target, params.upscaler_2)
        if second.size != first.size:
            second = resize_image(second, first.size)
        first = Image.blend(first, second, params.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = params.upscaler_2
        info["Postprocess upscaler 2 visibility"] = params.extras_upscaler_2_visibility
    if params.resize_mode == 1 and params.upscaling_crop:
        w, h = params.upscaling_resize_w, params.upscaling_resize_h
        cropped = Image.new("RGB", (w, h))
        cropped.paste(first, box=(w // 2 - first.width // 2, h // 2 - first.height // 2))
        first = cropped
        info["Postprocess crop to"] = f"{w}x{h}"
    return first, info


def postprocess(image: Image.Image, params: ExtrasParams, upscale: UpscaleFn,
                restore: RestoreFn | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """The extras steps in A1111's order (faces first unless "Upscale before restoring faces")."""
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    wants_faces = params.gfpgan_visibility > 0 or params.codeformer_visibility > 0
    steps = ["upscale", "faces"] if params.upscale_first else ["faces", "upscale"]
    for step in steps:
        if step == "upscale":
            image, added = upscale_step(image, params, upscale)
        elif wants_faces:
            if restore is None:
                raise ProcessingError("face restoration is not available (see the Extras tab for the files it needs)")
            image, added = restore(image, params)
        else:
            continue
        info.update(added)
    return image, info


def info_text(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items())


def source_pnginfo(image: Image.Image) -> dict[str, str]:
    return {k: v for k, v in (image.info or {}).items() if isinstance(k, str) and isinstance(v, str)}


@dataclass
class ExtrasResult:
    images: list[Image.Image]
    info: dict[str, Any]           # the last image's info fields
    paths: list[Path]              # saved files ([] when saving was off)
    interrupted: bool = False


def list_directory_images(directory: Path, limits: Limits) -> list[Path]:
    """Image files directly in `directory` (sorted), at most limits.max_input_images."""
    if not directory.is_dir():
        raise ProcessingError(f"input directory {directory} does not exist or is not a folder")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) > limits.max_input_images:
        raise ProcessingError(f"{directory}: {len(files)} images; at most {limits.max_input_images} per batch "
                              f"(--max-input-images)")
    return files


def check_limits(params: ExtrasParams, images: list[Image.Image], limits: Limits) -> None:
    try:
        for image in images:
            params.check_target(image.size, limits)
    except LimitError as err:
        raise ProcessingError(str(err)) from None

