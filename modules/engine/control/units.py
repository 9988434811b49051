"""ControlNet units inside our own sampling loop.

``prepare_inputs`` turns the typed units into what the loop needs (a loaded diffusers
``ControlNetModel`` and the preprocessed map), and ``ControlApplier.residuals`` computes, for one
UNet call, the sum of every active unit's down/mid residuals that diffusers' UNet takes as
``down_block_additional_residuals`` / ``mid_block_additional_residual``.

sd-webui-controlnet's semantics, re-implemented here:

* a unit runs while ``guidance_start <= step / steps < guidance_end`` (so start = end never runs);
* "My prompt is more important" and "ControlNet is more important" scale residual ``i`` of ``n``
  by ``weight * 0.825 ** (n - 1 - i)`` (soft injection: deep blocks strong, shallow ones weak);
* "ControlNet is more important" also adds the control to the conditional rows only, so CFG
  pushes towards it (the unconditional rows run without it);
* the map is fitted to the image size with the unit's resize mode (Just Resize, Crop and Resize,
  Resize and Fill), and refitted to the hires size in the hires-fix pass.

reference_only / reference_adain(+attn) units have no model: ``reference_scope`` wraps each UNet call
with their write pass and attention/AdaIN injection (engine/control/reference.py).

T2I-Adapters (diffusers ``T2IAdapter``) work the same way, through the UNet's
``down_intrablock_additional_residuals``; their features do not depend on the step, so they are
computed once per pass. Their soft-injection scales are the extension's (0.25, 0.62, 0.825, 1.0).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from modules.core.controlnet_units import REFERENCE_MODULES
from modules.engine.control.preprocessors import PreprocessorArgs, get_preprocessor

SOFT_INJECTION_BASE = 0.825   # lllyasviel's guess-mode decay per block
ADAPTER_SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)   # sd-webui-controlnet's, for 4-level T2I-Adapters
DEFAULT_PROCESSOR_RES = 512
BALANCED, PROMPT_MORE, CONTROL_MORE = "Balanced", "My prompt is more important", "ControlNet is more important"


@dataclass
class ControlInput:
    """One active unit, ready for the loop."""
    name: str                  # the model's title, for messages
    model: Any                 # diffusers ControlNetModel
    detected_map: Image.Image  # the preprocessor's output, before fitting to the image size
    resize_mode: str
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: str
    low_vram: bool = False
    hr_option: str = "Both"
    module: str = "none"       # the preprocessor: tile_colorfix / inpaint_only also act in the loop (postprocess.py);
                               # a reference_* one has no model (engine.control.reference)
    threshold_a: float = -1    # reference_*: the style fidelity
    threshold_b: float = -1


# ---------------------------------------------------------------- maps


def fit_map(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """The control map at width x height: stretched, cropped to cover, or fitted inside and padded
    with black (black is "no control" for edge, line and depth maps). RGBA maps (the inpaint
    preprocessors': the mask in alpha) keep their alpha; padding is unmasked."""
    image = image.convert("RGBA" if image.mode == "RGBA" else "RGB")
    if resize_mode == "Just Resize" or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    scale_cover = max(width / image.width, height / image.height)
    scale_fit = min(width / image.width, height / image.height)
    scale = scale_fit if resize_mode == "Resize and Fill" else scale_cover
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, ((width - w) // 2, (height - h) // 2))
    return canvas


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution that makes the map's short side land on the image exactly."""
    raw_w, raw_h = size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return int(round(k * min(raw_w, raw_h)))


def run_preprocessor(module: str, image: Image.Image, args: PreprocessorArgs) -> Image.Image:
    return get_preprocessor(module).run(image, args)


def takes_mask(module: str) -> bool:
    """The inpaint family reads the mask from the alpha channel (others composite alpha onto white)."""
    return "inpaint" in (module or "")


def detect_map(unit: Any, source: Image.Image, width: int, height: int, mask: Image.Image | None = None,
               seed: int | None = None) -> Image.Image:
    """Unit `unit` (core.controlnet_units.ControlNetUnit) on `source`: its preprocessor's map.
    `mask` (white = repaint): the unit's own, else the img2img mask; given to the inpaint family."""
    image = source
    mask = unit.mask if unit.mask is not None else mask
    if mask is not None and takes_mask(unit.module):
        from modules.engine.control.annotators import compose_inpaint_input

        image = compose_inpaint_input(source, mask)
    resolution = unit.processor_res if unit.processor_res > 0 else DEFAULT_PROCESSOR_RES
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(source.size, width, height, unit.resize_mode)
    args = PreprocessorArgs(resolution=resolution, threshold_a=unit.threshold_a, threshold_b=unit.threshold_b,
                            seed=seed)
    return run_preprocessor(unit.module, image, args)


def prepare_inputs(units: list[Any], sources: list[Image.Image | None], width: int, height: int,
                   load_model: Callable[[str, bool], tuple[str, Any]],
                   masks: list[Image.Image | None] | None = None, seed: int | None = None) -> list[ControlInput]:
    """The active units (weight > 0, a non-empty guidance window) as ControlInputs.

    `sources[i]`: unit i's input image (its own, or the img2img image); `load_model(name, low_vram)` ->
    (title, ControlNetModel), raising a clear error for unknown or incompatible models."""
    inputs = []
    for index, (unit, source) in enumerate(zip(units, sources)):
        if not unit.active or unit.weight == 0 or unit.guidance_start >= unit.guidance_end:
            continue
        if source is None:
            raise ValueError(f"ControlNet unit {index} has no input image (and there is no img2img image to use)")
        reference = unit.module in REFERENCE_MODULES
        title, model = (unit.module, None) if reference else load_model(unit.model, bool(unit.low_vram))
        inputs.append(ControlInput(
            name=title, model=model,
            detected_map=detect_map(unit, source, width, height, masks[index] if masks else None, seed),
            resize_mode=unit.resize_mode, weight=float(unit.weight), guidance_start=float(unit.guidance_start),
            guidance_end=float(unit.guidance_end), control_mode=unit.control_mode, low_vram=bool(unit.low_vram),
            hr_option=unit.hr_option, module=unit.module, threshold_a=float(unit.threshold_a),
            threshold_b=float(unit.threshold_b)))
    return inputs


def map_to_tensor(image: Image.Image, device, dtype) -> torch.Tensor:
    """[1, 3, H, W] in 0..1, as diffusers' ControlNet pipelines feed the hint; an RGBA (inpaint) map
    becomes the inpaint ControlNet's hint: masked pixels -1."""
    if image.mode == "RGBA":
        from modules.engine.control.annotators import inpaint_hint

        array = np.ascontiguousarray(inpaint_hint(image), dtype=np.float32)
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


# ---------------------------------------------------------------- the loop


def block_scales(n: int, weight: float, mode: str, adapter: bool = False) -> list[float]:
    if mode == BALANCED:
        return [weight] * n
    if adapter and n == len(ADAPTER_SOFT_SCALES):
        return [weight * s for s in ADAPTER_SOFT_SCALES]
    return [weight * SOFT_INJECTION_BASE ** float(n - 1 - i) for i in range(n)]


def is_adapter(model: Any) -> bool:
    return type(model).__name__ == "T2IAdapter"


def _hint_for(unit: "ControlInput", width: int, height: int, device) -> torch.Tensor:
    fitted = fit_map(unit.detected_map, width, height, unit.resize_mode)
    if is_adapter(unit.model) and unit.model.config.in_channels == 1:
        return map_to_tensor(fitted, device, unit.model.dtype).mean(dim=1, keepdim=True)
    return map_to_tensor(fitted, device, unit.model.dtype)


class ControlApplier:
    """The units of one pass (first pass or hires), with their maps fitted to that pass's size."""

    def __init__(self, inputs: list[ControlInput], width: int, height: int, device, *, hires: bool = False,
                 host: Any = None):
        wanted = "Low res only" if hires else "High res only"
        units = [u for u in inputs if u.hr_option != wanted]
        self.units = [u for u in units if u.module not in REFERENCE_MODULES]
        self.device = device
        self.hints = [_hint_for(u, width, height, device) for u in self.units]
        self._adapter_features: dict[int, list[torch.Tensor]] = {}
        # reference_* units: attention injection around each UNet call (`host()`: engine.control.reference.ReferenceHost)
        self.reference = _reference(units, width, height, host, hires)
        # postprocess.PredictionFix: tile_colorfix / inpaint_only's change of each UNet prediction, or None
        self.prediction_fix: Callable[..., torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.units) or self.reference is not None

    def reference_scope(self, x: torch.Tensor, t, embeds: torch.Tensor, added: dict | None, n_cond: int,
                        step: int, total: int):
        """A context for one UNet call: the reference units' write passes and injection (nothing without them)."""
        if self.reference is None:
            return contextlib.nullcontext()
        return self.reference.scope(x, t, embeds, added, n_cond, step, total)

    def adjust_prediction(self, x: torch.Tensor, t, out: torch.Tensor, n_cond: int) -> torch.Tensor:
        """The UNet's output `out` for input `x` (first `n_cond` rows conditional), after the units' in-loop
        post-processing (sd-webui-controlnet's colour fix and inpaint_only blend); unchanged without any."""
        return out if self.prediction_fix is None else self.prediction_fix(x, t, out, n_cond)

    def residuals(self, x: torch.Tensor, t, embeds: torch.Tensor, added: dict | None, n_cond: int,
                  step: int, total: int) -> dict[str, Any] | None:
        """The UNet's extra keyword arguments for one call whose first `n_cond` rows are conditional:
        summed ControlNet (down, mid) residuals and T2I-Adapter features; None when no unit runs."""
        fraction = step / max(total, 1)
        down_sum: list[torch.Tensor] | None = None
        mid_sum = None
        intrablock: list[torch.Tensor] | None = None
        for index, (unit, hint) in enumerate(zip(self.units, self.hints)):
            if not unit.guidance_start <= fraction < unit.guidance_end:
                continue
            rows = n_cond if unit.control_mode == CONTROL_MORE else x.shape[0]
            if rows == 0:
                continue
            if is_adapter(unit.model):
                features = self._adapter(index, unit, hint, rows, x.shape[0])
                intrablock = features if intrablock is None else [a + b for a, b in zip(intrablock, features)]
                continue
            down, mid = self._run(unit, hint, x[:rows], t, embeds[:rows], _rows(added, rows))
            scales = block_scales(len(down) + 1, unit.weight, unit.control_mode)
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
            if rows < x.shape[0]:   # conditional rows only: the rest get no control
                down = [_pad_rows(d, x.shape[0]) for d in down]
                mid = _pad_rows(mid, x.shape[0])
            down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
            mid_sum = mid if mid_sum is None else mid_sum + mid
        out: dict[str, Any] = {}
        if down_sum is not None:
            out["down_block_additional_residuals"] = down_sum
            out["mid_block_additional_residual"] = mid_sum
        if intrablock is not None:   # a new list per call: the UNet pops from it
            out["down_intrablock_additional_residuals"] = list(intrablock)
        return out or None

    def _adapter(self, index: int, unit: ControlInput, hint, rows: int, total_rows: int) -> list[torch.Tensor]:
        """The adapter's features (once per pass), scaled, for `rows` conditional rows of `total_rows`."""
        features = self._adapter_features.get(index)
        if features is None:
            model = unit.model
            if unit.low_vram:
                model.to(self.device)
            features = list(model(hint))
            if unit.low_vram and self.device.type != "cpu":
                model.to("cpu")
            self._adapter_features[index] = features
        scales = block_scales(len(features), unit.weight, unit.control_mode, adapter=True)
        out = [(f * s).expand(rows, -1, -1, -1) for f, s in zip(features, scales)]
        return [_pad_rows(f, total_rows) for f in out] if rows < total_rows else out

    def _run(self, unit: ControlInput, hint, x, t, embeds, added):
        model = unit.model
        if unit.low_vram:
            model.to(self.device)
        try:
            dtype = hint.dtype   # the model's, read once per pass: diffusers' ModelMixin.dtype walks every submodule
            down, mid = model(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                              controlnet_cond=hint.expand(x.shape[0], -1, -1, -1), conditioning_scale=1.0,
                              added_cond_kwargs=added, return_dict=False)
        finally:
            if unit.low_vram and self.device.type != "cpu":
                model.to("cpu")
        return list(down), mid


def _reference(units: list[ControlInput], width: int, height: int, host: Any, hires: bool):
    units = [u for u in units if u.module in REFERENCE_MODULES]
    if not units:
        return None
    if host is None:
        raise ValueError("the reference preprocessors need the checkpoint's UNet and VAE (no host given)")
    from modules.engine.control.reference import ReferenceInjector

    images = [fit_map(u.detected_map, width, height, u.resize_mode).convert("RGB") for u in units]
    return ReferenceInjector(units, images, host(), hires=hires)


def _rows(added: dict | None, rows: int) -> dict | None:
    return None if added is None else {k: v[:rows] for k, v in added.items()}


def _pad_rows(t: torch.Tensor, total: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((total - t.shape[0], *t.shape[1:]))])
