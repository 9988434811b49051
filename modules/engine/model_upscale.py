"""Running an upscaler model (a spandrel ImageModelDescriptor) on a PIL image: tiled, in bounded memory.

Hand-written because spandrel runs a model on a whole tensor only: the image is cut into overlapping
tiles of at most `tile` pixels a side, sized evenly so little is computed twice, each tile is run
alone, and the outputs are blended with linear ramps across the overlaps so no seam shows. Progress
is reported per tile and an interrupt stops between tiles. A1111's multi-pass rule: a model of scale s
asked for scale t runs ceil(log_s t) passes, then Lanczos resizes to the exact target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

MAX_PASSES = 4
TileProgress = Callable[[int, int], None]    # (tiles done, tiles in this pass)


class UpscaleInterrupted(Exception):
    """The job was interrupted between two tiles."""


@dataclass(frozen=True)
class TileSettings:
    tile: int = 192       # A1111's ESRGAN_tile; 0: the whole image at once
    overlap: int = 8      # ESRGAN_tile_overlap, in input pixels


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) spans covering `length`, each at most `tile` long, neighbours sharing >= `overlap`."""
    if tile <= 0 or length <= tile:
        return [(0, length)]
    overlap = min(overlap, tile // 2)
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)   # even tiles, no wider than `tile`
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return [(s, s + size) for s in starts]


def _ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    weights = torch.ones(length)
    n = min(fade, length // 2)
    if n > 0:
        ramp = (torch.arange(n, dtype=torch.float32) + 1) / (n + 1)
        if fade_start:
            weights[:n] = ramp
        if fade_end:
            weights[-n:] = ramp.flip(0)
    return weights


def _to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor.squeeze(0).permute(1, 2, 0).float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return Image.fromarray(array)


def run_tiled(model: Any, image: torch.Tensor, settings: TileSettings, *, on_tile: TileProgress | None = None,
              should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The model's output for `image` (1, C, H, W), computed tile by tile; raises UpscaleInterrupted."""
    _, _, height, width = image.shape
    scale = int(model.scale)
    ys = tile_spans(height, settings.tile, settings.overlap)
    xs = tile_spans(width, settings.tile, settings.overlap)
    if len(ys) == 1 and len(xs) == 1:
        out = model(image)
        if on_tile:
            on_tile(1, 1)
        return out
    out = torch.zeros((1, model.output_channels, height * scale, width * scale), dtype=torch.float32)
    weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
    fade = settings.overlap * scale
    total, done = len(ys) * len(xs), 0
    for y0, y1 in ys:
        wy = _ramp((y1 - y0) * scale, fade, y0 > 0, y1 < height)
        for x0, x1 in xs:
            if should_stop is not None and should_stop():
                raise UpscaleInterrupted()
            piece = model(image[:, :, y0:y1, x0:x1]).float().cpu()
            wx = _ramp((x1 - x0) * scale, fade, x0 > 0, x1 < width)
            w = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += piece * w
            weight[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += w
            done += 1
            if on_tile:
                on_tile(done, total)
    return out.div_(weight)


def passes_for(model_scale: int, target_scale: float) -> int:
    """A1111's rule: ceil(log_s t) passes of a scale-s model to reach scale t (one pass for s=1 or t<=1)."""
    if model_scale <= 1 or target_scale <= 1:
        return 1
    return max(1, min(MAX_PASSES, math.ceil(math.log(target_scale) / math.log(model_scale) - 1e-9)))


def _device_for(model: Any) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), (torch.float16 if model.supports_half else torch.float32)
    return torch.device("cpu"), torch.float32


def upscale_with_model(model: Any, image: Image.Image, size: tuple[int, int], settings: TileSettings, *,
                       on_tile: TileProgress | None = None,
                       should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """`image` upscaled by `model` to exactly `size`. The model moves to the GPU only while it works."""
    target_scale = max(size[0] / image.width, size[1] / image.height)
    device, dtype = _device_for(model)
    model.to(device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            for _ in range(passes_for(int(model.scale), target_scale)):
                if image.width >= size[0] and image.height >= size[1] and model.scale > 1:
                    break
                tensor = run_tiled(model, _to_tensor(image, device, dtype), settings, on_tile=on_tile,
                                   should_stop=should_stop)
                image = _to_image(tensor)
    finally:
        if device.type != "cpu":
            model.to(device="cpu", dtype=torch.float32)
            torch.cuda.empty_cache()
    return image if image.size == tuple(size) else image.resize(size, Image.Resampling.LANCZOS)
