"""Outpainting: grow the picture on chosen sides and inpaint the new area (A1111's
"Poor man's outpainting" script, as a plain function until the Script API exists).

The canvas is grown with `masking.expand_canvas`; the new size is rounded *up* to a multiple
of 8 by spreading the extra pixels over the requested sides (so the picture grows by at least
what was asked and the original is never resampled), then one inpainting job runs at that size
with the caller's seed. Where the mask is 0 (the original, less `2 * mask_blur` pixels of
overlap along each grown side, which is repainted so the seam blends) the result equals the input.

No gradio here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

from modules.core import masking
from modules.processing import MASKED_CONTENT, Img2ImgParams, ProcessingError, Processed

DIRECTIONS = ("left", "right", "up", "down")

__all__ = ["DIRECTIONS", "OutpaintPlan", "outpaint", "plan_outpaint", "outpaint_params"]


@dataclass
class OutpaintPlan:
    image: Any          # the grown canvas (RGB)
    mask: Any           # L, 255 = paint
    left: int
    right: int
    up: int
    down: int

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _margins(width: int, height: int, pixels: int, directions: Iterable[str]) -> tuple[int, int, int, int]:
    chosen = set(directions)
    unknown = chosen - set(DIRECTIONS)
    if unknown:
        raise ProcessingError(f"unknown outpainting direction(s) {sorted(unknown)}; choose from {', '.join(DIRECTIONS)}")
    if not chosen:
        raise ProcessingError("outpainting needs at least one direction")
    if pixels <= 0:
        raise ProcessingError(f"outpainting needs a positive number of pixels, got {pixels}")
    left, right, up, down = (pixels if d in chosen else 0 for d in DIRECTIONS)

    def spread(size: int, a: int, b: int) -> tuple[int, int]:
        extra = -(size + a + b) % 8
        if not extra:
            return a, b
        if a and b:  # split the rounding like the margins themselves
            return a + extra // 2, b + extra - extra // 2
        return (a + extra, b) if a else (a, b + extra)

    if left or right:
        left, right = spread(width, left, right)
    if up or down:
        up, down = spread(height, up, down)
    return left, right, up, down


def plan_outpaint(image: Any, *, pixels: int, directions: Iterable[str], mask_blur: int = 4) -> OutpaintPlan:
    """The grown canvas and its mask. A side that is not grown keeps its size, which must then
    already be a multiple of 8 (else it is grown by the few pixels needed)."""
    picture = masking.flatten(image)
    left, right, up, down = _margins(picture.width, picture.height, int(pixels), directions)
    w, h = picture.width + left + right, picture.height + up + down
    if w % 8:  # a side we do not grow is not a multiple of 8: grow it on the right
        right += -w % 8
    if h % 8:
        down += -h % 8
    canvas, mask = masking.expand_canvas(picture, left=left, right=right, up=up, down=down, fill_mode="edge",
                                         overlap=2 * max(0, int(mask_blur)))
    return OutpaintPlan(image=canvas, mask=mask, left=left, right=right, up=up, down=down)


def outpaint_params(base: Img2ImgParams, image: Any, *, pixels: int, directions: Iterable[str],
                    mask_blur: int = 4, inpainting_fill: int = 0) -> tuple[Img2ImgParams, OutpaintPlan]:
    """An inpaint job that paints the grown margins; everything else (prompt, seed, steps,
    sampler, denoising strength...) comes from `base`."""
    if inpainting_fill not in range(len(MASKED_CONTENT)):
        raise ProcessingError(f"masked content must be 0-{len(MASKED_CONTENT) - 1}, got {inpainting_fill}")
    plan = plan_outpaint(image, pixels=pixels, directions=directions, mask_blur=mask_blur)
    p = copy.deepcopy(base)
    p.init_images = [plan.image]
    p.mask = plan.mask
    p.width, p.height = plan.size
    p.resize_mode = 0
    p.mask_blur = int(mask_blur)
    p.inpainting_fill = int(inpainting_fill)
    p.inpainting_mask_invert = False
    p.inpaint_full_res = False
    return p, plan


def outpaint(generation: Any, base: Img2ImgParams, image: Any | None = None, *, pixels: int = 128,
             directions: Iterable[str] = DIRECTIONS, mask_blur: int = 4, inpainting_fill: int = 0,
             **submit_kwargs: Any) -> Processed:
    """Grow `image` (default: the first init image of `base`) and inpaint the new area through the
    shared job queue (`generation.img2img`)."""
    if image is None:
        if not base.init_images:
            raise ProcessingError("outpainting needs an image")
        image = base.init_images[0]
    params, _ = outpaint_params(base, image, pixels=pixels, directions=directions, mask_blur=mask_blur,
                                inpainting_fill=inpainting_fill)
    return generation.img2img(params, **submit_kwargs)
