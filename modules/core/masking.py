"""img2img / inpainting image preparation and paste-back, behaving like A1111 (v1.10).

Pure PIL + numpy. The flow is ``plan_inpaint`` (resize, mask, crop, fill) -> the caller encodes
``plan.init_image`` and generates at (width, height) -> ``paste_back`` puts the result into the
original picture. The core guarantee: wherever ``plan.mask_for_overlay`` is 0 the pasted result is
bit-identical to ``plan.original`` (so with mask blur 0, every unmasked pixel is untouched).

A1111 behaviour matched here:

* resize modes 0-3 and their pixel placement (integer centring, edge-stretched bands in "Resize and
  fill"); mode 3 is mode 0 for pixels, the caller resizes the latents;
* masks: an RGBA mask with any transparency is read from its alpha (binarised at > 128, A1111's
  default "mask_round"); anything else is its luminance, kept soft; invert, then a separable
  Gaussian blur (kernel 2*int(2.5*sigma + 0.5) + 1, sigma = blur, reflected borders, as cv2 does);
* "Whole picture": the overlay mask is the resized blurred mask doubled and clipped, so the blur
  only feathers outward and the masked area itself is fully replaced;
* "Only masked": the crop box is the bounding box of the *blurred* mask plus padding, grown to the
  job's aspect ratio; the picture keeps its own resolution (it is not resized to the job size), the
  crop is resized to (width, height) with "Resize and fill", and the result is resized back into
  the box with "Crop and resize";
* masked content "fill": layered blurs of the unmasked pixels at radii 256, 64, 16, 4, 2, 0; A1111
  fills the init image for every mode except "original" (latent noise/nothing then overwrite the
  masked latents anyway, and the filled colours still matter at the soft mask border).

Deliberate differences: masks are resized bilinearly, not with Lanczos (no ringing halo, so a
hard mask stays exactly 0 outside after resizing); "Resize and fill" always fills its bands completely (A1111 can leave a
1-pixel black row or column for odd sizes); a mask whose size differs from the image is first
stretched to the image size (A1111 silently misaligns the crop box in "Only masked"); an empty mask
in "Only masked" raises ``ValueError`` (A1111 falls back to "Whole picture" with a warning; the caller
can do the same by catching it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageColor, ImageFilter, ImageOps

__all__ = [
    "MASKED_CONTENT",
    "RESIZE_MODES",
    "UPSCALERS",
    "InpaintPlan",
    "crop_region",
    "expand_canvas",
    "expand_crop_region",
    "fill_masked",
    "flatten",
    "gaussian_blur_mask",
    "latent_mask_array",
    "paste_back",
    "plan_inpaint",
    "prepare_mask",
    "resize_image",
    "resize_mask",
]

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
UPSCALERS = ("None", "Lanczos", "Nearest")

Region = tuple[int, int, int, int]

_LANCZOS = Image.Resampling.LANCZOS
_NEAREST = Image.Resampling.NEAREST
# A1111's "fill": (blur radius, times composited), coarse to fine; radius 0 is the image itself.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


# --------------------------------------------------------------------------- resizing


def _mode_index(mode: int | str) -> int:
    if isinstance(mode, str):
        if mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
        return RESIZE_MODES.index(mode)
    if not 0 <= int(mode) < len(RESIZE_MODES):
        raise ValueError(f"resize mode must be 0..{len(RESIZE_MODES) - 1}, got {mode}")
    return int(mode)


def _scale(im: Image.Image, w: int, h: int, upscaler: str | None) -> Image.Image:
    """Resize to exactly w x h. Masks (L) and downscales always use Lanczos; "Nearest" upscales
    by the covering factor with nearest-neighbour and then fits the exact size with Lanczos, the
    way A1111's built-in upscalers are applied."""
    if upscaler is None:
        upscaler = "None"
    if upscaler not in UPSCALERS:
        raise ValueError(f"unknown upscaler {upscaler!r}; expected one of {UPSCALERS}")
    w, h = max(1, int(w)), max(1, int(h))
    if im.size == (w, h):
        return im.copy()
    if upscaler == "Nearest" and im.mode != "L":
        factor = max(w / im.width, h / im.height)
        if factor > 1:
            im = im.resize((max(1, int(im.width * factor)), max(1, int(im.height * factor))), _NEAREST)
    if im.size != (w, h):
        im = im.resize((w, h), _LANCZOS)
    return im


def resize_image(image: Image.Image, width: int, height: int, mode: int | str,
                 upscaler: str | None = "Lanczos") -> Image.Image:
    """A1111's img2img resize modes; the result is always width x height, in the image's mode.

    0 / 3 "Just resize": stretch. 1 "Crop and resize": scale to cover, centre-crop.
    2 "Resize and fill": scale to fit, centre, and stretch the outermost rows/columns of the
    scaled picture across the empty bands.
    """
    return _resize(image, width, height, mode, lambda im, w, h: _scale(im, w, h, upscaler))


def resize_mask(mask: Image.Image, width: int, height: int, mode: int | str) -> Image.Image:
    """`resize_image` for an L mask, with a bilinear (non-negative) filter instead of A1111's
    Lanczos: Lanczos rings, leaving faint non-zero values a few pixels outside a hard mask, which
    would let generated pixels bleed (by 1-2/255) into the area that must stay exact."""
    def scale(im: Image.Image, w: int, h: int) -> Image.Image:
        w, h = max(1, int(w)), max(1, int(h))
        return im.copy() if im.size == (w, h) else im.resize((w, h), Image.Resampling.BILINEAR)
    return _resize(mask.convert("L"), width, height, mode, scale)


def _resize(image: Image.Image, width: int, height: int, mode: int | str, scale_to) -> Image.Image:
    mode = _mode_index(mode)
    width, height = int(width), int(height)
    if mode in (0, 3):
        return scale_to(image, width, height)

    target_ratio = width / height
    src_ratio = image.width / image.height
    # Mode 1 matches the side whose ratio makes the other overflow; mode 2 the one that underflows.
    match_width = target_ratio > src_ratio if mode == 1 else target_ratio < src_ratio
    if match_width:
        sw, sh = width, image.height * width // image.width
    else:
        sw, sh = image.width * height // image.height, height
    scaled = scale_to(image, max(1, sw), max(1, sh))
    sw, sh = scaled.size
    x0, y0 = width // 2 - sw // 2, height // 2 - sh // 2

    if mode == 1:
        return scaled.crop((-x0, -y0, -x0 + width, -y0 + height))

    out = Image.new(scaled.mode, (width, height))
    out.paste(scaled, (x0, y0))
    if sh < height:  # bands above and below: repeat the first / last row
        if y0 > 0:
            out.paste(scaled.crop((0, 0, sw, 1)).resize((sw, y0), _NEAREST), (x0, 0))
        below = height - (y0 + sh)
        if below > 0:
            out.paste(scaled.crop((0, sh - 1, sw, sh)).resize((sw, below), _NEAREST), (x0, y0 + sh))
    if sw < width:  # bands left and right: repeat the first / last column
        if x0 > 0:
            out.paste(scaled.crop((0, 0, 1, sh)).resize((x0, sh), _NEAREST), (0, y0))
        right = width - (x0 + sw)
        if right > 0:
            out.paste(scaled.crop((sw - 1, 0, sw, sh)).resize((right, sh), _NEAREST), (x0 + sw, y0))
    return out


def flatten(image: Image.Image, background: str | tuple = "#ffffff") -> Image.Image:
    """RGB with any transparency composited onto `background` (A1111's img2img background colour
    option, white by default)."""
    if image.mode in ("RGBA", "LA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, ImageColor.getrgb(background) if isinstance(background, str)
                         else tuple(background))
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------- masks


def _mask_to_l(mask: Image.Image) -> Image.Image:
    """A brush editor's RGBA layer (transparent background, opaque strokes) is read from its alpha,
    binarised at > 128 like A1111's default. Fully opaque RGBA, RGB, L, 1... use luminance, soft."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
        return rgba.convert("L")
    return mask.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    # cv2's sizing for a given sigma, as A1111 passes it: 2*int(2.5*sigma + 0.5) + 1 taps.
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    padded = np.pad(a, pad, mode="reflect")  # cv2's default border (reflect-101)
    out = np.zeros_like(a, dtype=np.float64)
    n = a.shape[axis]
    for i, weight in enumerate(k):
        out += weight * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur_mask(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """Separable Gaussian blur of an L mask; x and y blurred separately as A1111 does."""
    blur_y = blur_x if blur_y is None else blur_y
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    if blur_x > 0:
        a = _blur_axis(a, float(blur_x), axis=1)
    if blur_y > 0:
        a = _blur_axis(a, float(blur_y), axis=0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def prepare_mask(mask: Image.Image, *, invert: bool, blur: int, blur_y: int | None = None) -> Image.Image:
    """Mask (L, 255 = repaint) as A1111 builds it: read (see `_mask_to_l`), invert, then blur."""
    m = _mask_to_l(mask)
    if invert:
        m = ImageOps.invert(m)
    if blur > 0 or (blur_y or 0) > 0:
        m = gaussian_blur_mask(m, blur, blur_y)
    return m


def latent_mask_array(mask: Image.Image, latent_width: int, latent_height: int, *,
                      round_mask: bool = True) -> np.ndarray:
    """float32 [h, w] in 0..1 (1 = repaint) at latent resolution, as A1111 derives it from the
    processing-size mask: bicubic downscale, then rounded to 0/1 (its "mask_round" default)."""
    small = mask.convert("L").resize((latent_width, latent_height), Image.Resampling.BICUBIC)
    arr = np.asarray(small, dtype=np.float32) / 255.0
    return np.around(arr) if round_mask else arr


# --------------------------------------------------------------------------- only masked


def crop_region(mask: Image.Image, padding: int) -> Region:
    """(x1, y1, x2, y2), x2/y2 exclusive: the bounding box of non-zero mask pixels grown by
    `padding` on every side and clipped to the mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        raise ValueError("the mask is empty")
    x1, y1, x2, y2 = box
    p = max(0, int(padding))
    return max(x1 - p, 0), max(y1 - p, 0), min(x2 + p, mask.width), min(y2 + p, mask.height)


def _grow_span(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra` (half before, the rest after), slide it back inside [0, limit),
    and only then clip -- so the aspect is kept whenever the image is large enough."""
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def expand_crop_region(region: Region, target_w: int, target_h: int, image_w: int, image_h: int) -> Region:
    """Grow the shorter side of `region` so that its aspect ratio is target_w / target_h (the
    wanted size truncated to an integer, as A1111 does), keeping it inside the image if it fits."""
    x1, y1, x2, y2 = region
    w, h = x2 - x1, y2 - y1
    target = target_w / target_h
    if w / h > target:
        y1, y2 = _grow_span(y1, y2, int(w / target - h), image_h)
    else:
        x1, x2 = _grow_span(x1, x2, int(h * target - w), image_w)
    return x1, y1, x2, y2


# --------------------------------------------------------------------------- masked content


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": repaint the masked area with colours pulled in from around it.

    The unmasked pixels (weight 255 - mask) are blurred at decreasing radii and each layer is
    laid "over" the previous one, so coarse colour fills deep inside the hole and finer layers take
    over near its edge; the last layer is the image itself, so pixels with mask 0 are unchanged.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    keep = 255.0 - np.asarray(resize_mask(mask, image.width, image.height, 0), dtype=np.float64)
    # Premultiplied so blurring never pulls in the masked colours.
    premult = np.dstack([rgb * keep[..., None] / 255.0, keep])
    layer_src = Image.fromarray(np.clip(np.rint(premult), 0, 255).astype(np.uint8), "RGBA")

    acc = np.zeros(rgb.shape, dtype=np.float64)   # premultiplied colour, 0..1 alpha scale
    acc_a = np.zeros(keep.shape, dtype=np.float64)
    for radius, repeats in _FILL_PASSES:
        if radius == 0:
            layer, layer_a = rgb, keep / 255.0
        else:
            blurred = np.asarray(layer_src.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
            a = blurred[..., 3]
            layer = blurred[..., :3] * 255.0 / np.maximum(a, 1e-9)[..., None]
            # Like A1111's 8-bit RGBA layers: under 1/255 coverage the layer is transparent.
            layer_a = np.where(a >= 1.0, a / 255.0, 0.0)
        for _ in range(repeats):
            acc = layer * layer_a[..., None] + acc * (1.0 - layer_a[..., None])
            acc_a = layer_a + acc_a * (1.0 - layer_a)
    out = acc / np.maximum(acc_a, 1e-9)[..., None]
    out = np.where(acc_a[..., None] > 0, out, 0.0)
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # Exactness where nothing is masked, independent of float round-off.
    exact = keep >= 255.0
    result[exact] = np.asarray(image.convert("RGB"))[exact]
    return Image.fromarray(result, "RGB")


# --------------------------------------------------------------------------- plan and paste-back


@dataclass
class InpaintPlan:
    """Everything from preparation to paste-back.

    original: RGB picture the result is pasted into: the init image resized to the job size for
        "Whole picture", the init image at its own size for "Only masked" (as in A1111).
    mask_for_overlay: L, same size as `original`; alpha of the generated pixels in paste-back.
        Inverted and blurred; doubled-and-clipped for "Whole picture".
    mask_for_latents: L at the processing size (width x height); the blurred mask, *not* rounded --
        A1111 rounds it to 0/1 only after scaling to latent size (`latent_mask_array`).
    init_image: RGB at (width, height), the picture to encode: cropped for "Only masked" and
        filled for every masked-content mode except "original".
    crop: (x1, y1, x2, y2) in `original` coordinates for "Only masked", else None.
    """
    original: Image.Image
    mask_for_overlay: Image.Image
    mask_for_latents: Image.Image
    init_image: Image.Image
    crop: Region | None


def plan_inpaint(image: Image.Image, mask: Image.Image, *, width: int, height: int, resize_mode: int | str,
                 mask_blur: int, invert: bool, inpainting_fill: int, full_res: bool, padding: int,
                 upscaler: str | None = "Lanczos", mask_blur_y: int | None = None,
                 background: str = "#ffffff") -> InpaintPlan:
    """Prepare one inpainting job the way A1111's img2img does (see the module docstring)."""
    if not 0 <= int(inpainting_fill) < len(MASKED_CONTENT):
        raise ValueError(f"inpainting_fill must be 0..{len(MASKED_CONTENT) - 1}, got {inpainting_fill}")
    picture = flatten(image, background)
    m = _mask_to_l(mask)
    if m.size != picture.size:  # the mask is drawn over the picture: align it first
        m = resize_mask(m, picture.width, picture.height, 0)
    m = prepare_mask(m, invert=invert, blur=mask_blur, blur_y=mask_blur_y)

    if full_res:
        region = expand_crop_region(crop_region(m, padding), width, height, m.width, m.height)
        original = picture
        overlay = m
        latents_mask = resize_mask(m.crop(region), width, height, 2)
        init = resize_image(picture.crop(region), width, height, 2)
        crop: Region | None = region
    else:
        original = resize_image(picture, width, height, resize_mode, upscaler)
        latents_mask = resize_mask(m, width, height, resize_mode)
        doubled = np.clip(np.asarray(latents_mask, dtype=np.uint16) * 2, 0, 255).astype(np.uint8)
        overlay = Image.fromarray(doubled, "L")
        init = original.copy()
        crop = None

    if int(inpainting_fill) != 1:
        init = fill_masked(init, latents_mask)
    return InpaintPlan(original=original, mask_for_overlay=overlay, mask_for_latents=latents_mask,
                       init_image=init, crop=crop)


def paste_back(result: Image.Image, plan: InpaintPlan) -> Image.Image:
    """Put a generated image back: into the crop box ("Crop and resize") for "Only masked", else
    over the whole picture, then blend with `mask_for_overlay` as alpha. Where that mask is 0 the
    output is exactly `plan.original`; where it is 255, exactly the generated pixels."""
    original = plan.original.convert("RGB")
    generated = flatten(result)
    if plan.crop is not None:
        x1, y1, x2, y2 = plan.crop
        canvas = original.copy()
        canvas.paste(resize_image(generated, x2 - x1, y2 - y1, 1), (x1, y1))
        generated = canvas
    elif generated.size != original.size:
        generated = resize_image(generated, original.width, original.height, 1)

    alpha = np.asarray(resize_mask(plan.mask_for_overlay, original.width, original.height, 0),
                       dtype=np.uint32)[..., None]
    base = np.asarray(original, dtype=np.uint32)
    gen = np.asarray(generated, dtype=np.uint32)
    # Integer blend, rounded: alpha 0 and 255 give the inputs back bit for bit.
    out = (base * (255 - alpha) + gen * alpha + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- outpainting


def expand_canvas(image: Image.Image, *, left: int = 0, right: int = 0, up: int = 0, down: int = 0,
                  fill_mode: Literal["edge", "noise", "blur"] = "edge", overlap: int = 8,
                  seed: int | None = None) -> tuple[Image.Image, Image.Image]:
    """Grow the picture by the given margins for outpainting; returns (expanded RGB, mask L).

    New pixels: "edge" stretches the outermost rows/columns outward (corners take the corner
    pixel); "noise" is Gaussian noise with the picture's per-channel mean and spread; "blur" is the
    masked-content "fill" of the new area. The mask is 255 on the new area and on `overlap` pixels
    of the original along each grown side (A1111's outpainting scripts overlap by 2 * mask blur so
    the seam is repainted), 0 on the rest of the original.
    """
    margins = [int(v) for v in (left, right, up, down)]
    if min(margins) < 0:
        raise ValueError("margins must be >= 0")
    left, right, up, down = margins
    src = flatten(image)
    a = np.asarray(src)
    h, w = a.shape[:2]
    padded = np.pad(a, ((up, down), (left, right), (0, 0)), mode="edge")
    new_h, new_w = padded.shape[:2]

    mask = np.full((new_h, new_w), 255, dtype=np.uint8)
    ov = max(0, int(overlap))
    # Overlap is clipped so that at least one original pixel row/column stays unmasked.
    kx1 = left + (min(ov, (w - 1) // 2) if left else 0)
    kx2 = left + w - (min(ov, (w - 1) // 2) if right else 0)
    ky1 = up + (min(ov, (h - 1) // 2) if up else 0)
    ky2 = up + h - (min(ov, (h - 1) // 2) if down else 0)
    mask[ky1:ky2, kx1:kx2] = 0

    new_area = np.ones((new_h, new_w), dtype=bool)
    new_area[up:up + h, left:left + w] = False
    if fill_mode == "edge":
        out = padded
    elif fill_mode == "noise":
        rng = np.random.default_rng(seed)
        flat = a.reshape(-1, 3).astype(np.float64)
        noise = rng.normal(flat.mean(0), flat.std(0) + 1e-6, size=(new_h, new_w, 3))
        out = padded.copy()
        out[new_area] = np.clip(np.rint(noise[new_area]), 0, 255).astype(np.uint8)
    elif fill_mode == "blur":
        canvas = Image.fromarray(padded, "RGB")
        hole = Image.fromarray(np.where(new_area, 255, 0).astype(np.uint8), "L")
        out = np.asarray(fill_masked(canvas, hole))
    else:
        raise ValueError(f"unknown fill_mode {fill_mode!r}; expected 'edge', 'noise' or 'blur'")
    return Image.fromarray(np.ascontiguousarray(out), "RGB"), Image.fromarray(mask, "L")
