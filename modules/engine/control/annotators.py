"""The ControlNet preprocessors ("annotators"), by sd-webui-controlnet's module names and sliders.

Model-free ones are written here on OpenCV/numpy and follow the extension's steps (same
resize-and-pad, filters and thresholds); one deliberate difference: scribble_xdog thresholds without
the uint8 wraparound the extension has. The depth ones (and normal_midas) run a local transformers
estimator (modules/models/depth.py), which sees the image at its processor's size (DPT: 384x384).
Those that need the controlnet-aux annotators (openpose, HED, PiDiNet, lineart models, MLSD, ...)
are listed and refused: controlnet-aux requires torchvision and timm, which this project does not install.

reference_only/reference_adain(+attn) are listed here with the image itself as their "map"; their work
is attention injection in the sampling loop (engine/control/reference.py). Left out: the CLIP-vision
"preprocessors" of IP-Adapter/T2I style (they produce embeddings).

Every function takes and returns PIL images; slider values outside a slider's range fall back to its
default, as the extension does for -1 ("use the default").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from modules.core.controlnet_units import REFERENCE_MODULES
from modules.models import depth as depth_models


def _cv2():
    import cv2  # ~0.2 s: imported when a map is made, not when the registry is

    return cv2


# ---------------------------------------------------------------- sliders (module_detail)


@dataclass(frozen=True)
class Slider:
    label: str
    minimum: float = 0.0
    maximum: float = 1.0
    value: float = 0.5
    step: float = 0.01
    visible: bool = True

    def api_json(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def pick(self, value: float | None) -> float:
        """The value to use: the given one when inside the range, else the default."""
        if value is None or not self.minimum <= value <= self.maximum:
            return self.value
        return value


# The extension's default resolution slider; shown for every preprocessor unless it hides it.
RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)
HIDDEN = Slider("", visible=False)
# tile_colorfix(+sharp)'s sliders: the sampling loop reads them too (engine/control/postprocess.py).
COLORFIX_VARIATION = Slider("Variation", 3.0, 32.0, 8.0, 1.0)
COLORFIX_SHARPNESS = Slider("Sharpness", 0.0, 2.0, 1.0, 0.01)


@dataclass(frozen=True)
class Resolved:
    resolution: int
    a: float
    b: float
    seed: int | None = None


# What preprocessors.py registers: keyword arguments of its Preprocessor, in the extension's order.
BUILTIN: list[dict] = []


def add(name: str, run: Callable[[np.ndarray, Resolved], np.ndarray], *, label: str = "",
        resolution: Slider = RESOLUTION, a: Slider = HIDDEN, b: Slider = HIDDEN, model_free: bool = False,
        unavailable: Callable[[], str | None] = lambda: None, rgba: bool = False) -> None:
    """A preprocessor whose core maps an HxWx3 (HxWx4 with `rgba`) uint8 array to a uint8 array."""
    sliders = [s.api_json() for s in (resolution, a, b) if s.visible]

    def call(image: Image.Image, args) -> Image.Image:  # args: preprocessors.PreprocessorArgs
        resolved = Resolved(int(resolution.pick(args.resolution)), a.pick(args.threshold_a),
                            b.pick(args.threshold_b), getattr(args, "seed", None))
        out = run(_rgba(image) if rgba else hwc3(image), resolved)
        return Image.fromarray(np.ascontiguousarray(out)).convert("RGBA" if rgba else "RGB")

    BUILTIN.append(dict(name=name, run=call, detail={"model_free": model_free, "sliders": sliders},
                        unavailable=unavailable, label=label or name))


# ---------------------------------------------------------------- the extension's image plumbing


def hwc3(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8; transparency composited onto white (as the extension's HWC3 does)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _rgba(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.uint8)


def _gray3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def _pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale so the short side is `resolution` (cubic up, area down), then edge-pad to multiples of
    64 for the detector; the returned function crops a result back to the scaled size."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    if scaled.ndim == 2:
        scaled = scaled[..., None]
    padded = np.pad(scaled, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), lambda x: np.ascontiguousarray(x[:th, :tw])


# ---------------------------------------------------------------- model-free maps


def canny(img: np.ndarray, r: Resolved) -> np.ndarray:
    padded, unpad = resize_with_pad(img, r.resolution)
    return _gray3(unpad(_cv2().Canny(padded, int(r.a), int(r.b))))


def threshold(img: np.ndarray, r: Resolved) -> np.ndarray:
    padded, unpad = resize_with_pad(img, r.resolution)
    out = np.zeros_like(padded)
    out[np.min(padded, axis=2) > r.a] = 255
    return unpad(out)


def scribble_xdog(img: np.ndarray, r: Resolved) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 and 5), thresholded: white strokes on black."""
    cv2 = _cv2()
    padded, unpad = resize_with_pad(img, r.resolution)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded)
    # In int32: the extension computes this in uint8, where doubling strokes stronger than 127 wraps.
    out[2 * (255 - dog.astype(np.int32)) > r.a] = 255
    return unpad(out)


def lineart_standard(img: np.ndarray, r: Resolved) -> np.ndarray:
    """Dark lines on a light background -> white lines on black, scaled by the median line strength."""
    padded, unpad = resize_with_pad(img, r.resolution)
    x = padded.astype(np.float32)
    blurred = _cv2().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 0.0)
    intensity *= 127
    return _gray3(unpad(intensity.clip(0, 255).astype(np.uint8)))


def tile_resample(img: np.ndarray, r: Resolved) -> np.ndarray:
    """The input, downsampled by the rate (below 1.1: unchanged); no resolution step."""
    if r.a < 1.1:
        return img
    h, w = int(img.shape[0] / r.a), int(img.shape[1] / r.a)
    return _cv2().resize(img, (max(1, w), max(1, h)), interpolation=_cv2().INTER_AREA)


def identity(img: np.ndarray, r: Resolved) -> np.ndarray:
    """tile_colorfix(+sharp): the map is the input; the colour fix itself happens while sampling
    (engine/control/postprocess.py: the input's blurred latent replaces the predicted x0's low frequencies)."""
    return img


def invert(img: np.ndarray, r: Resolved) -> np.ndarray:
    return 255 - img


def blur_gaussian(img: np.ndarray, r: Resolved) -> np.ndarray:
    padded, unpad = resize_with_pad(img, r.resolution)
    return _gray3(_cv2().GaussianBlur(unpad(padded), (0, 0), float(r.a)))


def _noise_disk(h: int, w: int, f: int, rand: np.random.RandomState) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse uniform noise, cubic-upscaled, cropped, min-max normalised."""
    noise = rand.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = _cv2().resize(noise, (w + 2 * f, h + 2 * f), interpolation=_cv2().INTER_CUBIC)[f:f + h, f:f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[..., None] if noise.ndim == 2 else noise


def shuffle(img: np.ndarray, r: Resolved) -> np.ndarray:
    """Content shuffle: remap pixels through a smooth random flow field. `seed` (the extension
    seeds NumPy with (seed + subseed) & 0xFFFFFFFF) makes it repeatable; None draws fresh noise."""
    padded, unpad = resize_with_pad(img, r.resolution)
    x = unpad(padded)
    h, w = x.shape[:2]
    rand = np.random.RandomState(r.seed & 0xFFFFFFFF) if r.seed is not None else np.random.mtrand._rand
    flow_x = _noise_disk(h, w, 256, rand) * float(w - 1)
    flow_y = _noise_disk(h, w, 256, rand) * float(h - 1)
    flow = np.concatenate([flow_x, flow_y], axis=2).astype(np.float32)
    return _gray3(_cv2().remap(x, flow, None, _cv2().INTER_LINEAR))


def color_grid(img: np.ndarray, r: Resolved) -> np.ndarray:
    """t2ia_color_grid: short side to the resolution, then 64-pixel colour cells."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    if h < w:
        nh, nw = r.resolution, int(round(w / h * r.resolution))
    else:
        nh, nw = int(round(h / w * r.resolution)), r.resolution
    scaled = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(scaled, (max(1, nw // 64), max(1, nh // 64)), interpolation=cv2.INTER_CUBIC)
    return _gray3(cv2.resize(cells, (nw, nh), interpolation=cv2.INTER_NEAREST))


def _recolor(conversion: str, channel: int) -> Callable[[np.ndarray, Resolved], np.ndarray]:
    def run(img: np.ndarray, r: Resolved) -> np.ndarray:
        cv2 = _cv2()
        # The extension converts its RGB array with the BGR codes; kept so the maps match its maps.
        value = cv2.cvtColor(img, getattr(cv2, conversion))[:, :, channel].astype(np.float32) / 255.0
        return _gray3((value ** r.a * 255.0).clip(0, 255).astype(np.uint8))
    return run


# ---------------------------------------------------------------- the inpaint family


def compose_inpaint_input(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The inpaint preprocessors' input: the picture with the mask (white = repaint) as alpha."""
    rgba = Image.fromarray(hwc3(image), "RGB").convert("RGBA")
    alpha = mask.convert("L").resize(rgba.size) if mask is not None else Image.new("L", rgba.size, 0)
    rgba.putalpha(alpha)
    return rgba


def inpaint(img: np.ndarray, r: Resolved) -> np.ndarray:
    """RGBA: the picture (transparency kept only as the mask) with the mask binarised at 127."""
    out = img.copy()
    out[..., 3] = np.where(img[..., 3] > 127, 255, 0).astype(np.uint8)
    return out


def inpaint_hint(control_map: Image.Image) -> np.ndarray:
    """The control image an inpaint ControlNet sees, HxWx3 float32: the picture in 0..1 with every
    masked pixel set to -1 (the ControlNet inpaint protocol)."""
    rgba = np.asarray(control_map.convert("RGBA"), dtype=np.float32) / 255.0
    masked = (rgba[..., 3:4] > 0.5).astype(np.float32)
    return rgba[..., :3] * (1.0 - masked) - masked


# ---------------------------------------------------------------- depth (a local transformers estimator)


def _depth(family: str, prefer_v2: bool | None, example: str, to_map=None):
    """(run, unavailable) of a preprocessor on the estimator of `family`; `to_map(nearness, r)` makes
    the map (default: the min-max normalised grey depth)."""
    def unavailable() -> str | None:
        estimators = depth_models.default_estimators()
        return None if estimators.find(family, prefer_v2) else estimators.missing_message(family, example)

    def run(img: np.ndarray, r: Resolved) -> np.ndarray:
        estimators = depth_models.default_estimators()
        padded, unpad = resize_with_pad(img, r.resolution)
        nearness = estimators.estimate(Image.fromarray(padded), estimators.require(family, prefer_v2, example))
        # Made over the padded map, then cropped, as the extension's detectors do.
        return unpad(to_map(nearness, r) if to_map else np.asarray(depth_models.to_grey_map(nearness)))
    return run, unavailable


def normal_from_depth(depth: np.ndarray, r: Resolved, a: float = np.pi * 2.0) -> np.ndarray:
    """normal_midas: surface normals from the depth's Sobel gradients (z = 2 pi); where the normalised
    depth is below the background threshold the normal faces the viewer. Channels as the extension's (BGR)."""
    cv2 = _cv2()
    span = float(depth.max() - depth.min())
    relative = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[relative < r.a] = 0
    y[relative < r.a] = 0
    normal = np.stack([x, y, np.full_like(x, a)], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1]


# ---------------------------------------------------------------- the registry entries

_NEEDS_AUX = ("needs the controlnet-aux annotator models, which this install does not include: controlnet-aux "
              "requires torchvision and timm, which this project does not ship. Make the map elsewhere and use "
              "the 'none' preprocessor with it.")


_NEEDS_LAMA = ("needs the LaMa inpainting model (ControlNetLama.pth), which no library this project ships can run; "
               "use inpaint_only (the same in-loop blend, without LaMa's pre-fill of the masked area).")


def _needs_aux(label: str) -> Callable[[], str]:
    return lambda: f"{label} {_NEEDS_AUX}"


def _refuse(img: np.ndarray, r: Resolved) -> np.ndarray:
    raise RuntimeError("this preprocessor is not available")  # get_preprocessor refuses it first


def _register_builtin() -> None:
    a_canny, b_canny = Slider("Low Threshold", 1, 255, 100, 1), Slider("High Threshold", 1, 255, 200, 1)
    add("canny", canny, a=a_canny, b=b_canny)
    for name, family, v2, example in (("depth", "midas", None, "dpt-hybrid-midas"),
                                      ("depth_anything", "depth_anything", False, "depth-anything-small-hf"),
                                      ("depth_anything_v2", "depth_anything", True, "Depth-Anything-V2-Small-hf")):
        run, unavailable = _depth(family, v2, example)
        add(name, run, label="depth_midas" if name == "depth" else name, unavailable=unavailable)
    run, unavailable = _depth("midas", None, "dpt-hybrid-midas", normal_from_depth)
    add("normal_map", run, label="normal_midas", unavailable=unavailable,
        a=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, 0.01))
    add("inpaint", inpaint, label="inpaint_global_harmonious", resolution=HIDDEN, rgba=True)
    add("inpaint_only", inpaint, resolution=HIDDEN, rgba=True)
    # Its in-loop part is inpaint_only's (postprocess.py); the LaMa fill of the masked area needs a model.
    add("inpaint_only+lama", _refuse, resolution=HIDDEN, rgba=True, unavailable=lambda: _NEEDS_LAMA)
    add("lineart_standard", lineart_standard, label="lineart_standard (from white bg & black line)")
    add("scribble_xdog", scribble_xdog, a=Slider("XDoG Threshold", 1, 64, 32))
    add("shuffle", shuffle, resolution=Slider("", value=512, visible=False))
    add("blur_gaussian", blur_gaussian, a=Slider("Sigma", 0.01, 64.0, 9.0))
    add("threshold", threshold, a=Slider("Binarization Threshold", 0, 255, 127))
    add("color", color_grid, label="t2ia_color_grid")
    add("tile_resample", tile_resample, a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01))
    add("tile_colorfix", identity, a=COLORFIX_VARIATION)
    add("tile_colorfix+sharp", identity, a=COLORFIX_VARIATION, b=COLORFIX_SHARPNESS)
    gamma = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
    add("recolor_luminance", _recolor("COLOR_BGR2LAB", 0), a=gamma)
    add("recolor_intensity", _recolor("COLOR_BGR2HSV", 2), a=gamma)
    _register_needing_aux()
    # Attention injection (engine.control.reference): the map is the image itself; no model.
    fidelity = Slider("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5, 0.01)
    for name in REFERENCE_MODULES:
        add(name, lambda img, r: img, resolution=HIDDEN, a=fidelity, model_free=True)


def _register_needing_aux() -> None:
    near = Slider("Remove Near %", 0, 100, 0, 0.1), Slider("Remove Background %", 0, 100, 0, 0.1)
    sliders: dict[str, tuple[Slider, ...]] = {
        "mlsd": (Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
                 Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)),
        "mediapipe_face": (Slider("Max Faces", 1, 10, 1, 1), Slider("Min Face Confidence", 0.01, 1.0, 0.5, 0.01)),
        "depth_leres": near, "depth_leres++": near,
    }
    labels = {"hed": "softedge_hed", "hed_safe": "softedge_hedsafe", "pidinet": "softedge_pidinet",
              "pidinet_safe": "softedge_pidisafe", "pidinet_scribble": "scribble_pidinet",
              "pidinet_sketch": "t2ia_sketch_pidi", "lineart": "lineart_realistic",
              "segmentation": "seg_ufade20k", "oneformer_ade20k": "seg_ofade20k", "oneformer_coco": "seg_ofcoco",
              "anime_face_segment": "seg_anime_face"}
    names = ("openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dw_openpose_full",
             "animal_openpose", "hed", "hed_safe", "pidinet", "pidinet_safe", "scribble_hed", "pidinet_scribble",
             "pidinet_sketch", "lineart", "lineart_coarse", "lineart_anime", "lineart_anime_denoise", "mlsd",
             "normal_bae", "mediapipe_face", "depth_zoe", "depth_leres", "depth_leres++",
             "segmentation", "oneformer_ade20k", "oneformer_coco", "anime_face_segment")
    for name in names:
        label = labels.get(name, name)
        extra = dict(zip(("a", "b"), sliders.get(name, ())))
        add(name, _refuse, label=label, unavailable=_needs_aux(label), **extra)


_register_builtin()
