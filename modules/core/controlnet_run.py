"""A job's ControlNet units -> the engine's inputs: models loaded (and checked against the
checkpoint's family), maps preprocessed, once per job."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

log = logging.getLogger(__name__)


def control_inputs(p: Any, ctx: Any, seed: int | None = None) -> list[Any] | None:
    """The engine's ControlInputs for `p.controlnet_units`, or None when no unit takes part. `seed`: for
    random preprocessors (shuffle), the extension's (seed + subseed) of the first image.
    Raises ControlNetUnitError with a message for the user."""
    from modules.core.controlnet_units import REFERENCE_MODULES, ControlNetUnitError as ProcessingError

    units = [u.normalized(i) for i, u in enumerate(getattr(p, "controlnet_units", None) or [])]
    if getattr(p, "mask", None) is not None and getattr(p, "init_images", None):
        units = [_harmonious_when_a1111_inpaints(u) for u in units]
    if not any(u.active and u.weight > 0 and u.guidance_start < u.guidance_end for u in units):
        return None
    registry = getattr(ctx, "controlnets", None)
    if registry is None and any(u.active and u.module not in REFERENCE_MODULES for u in units):
        raise ProcessingError("ControlNet units were given, but this server has no ControlNet model folder")
    from modules.engine.control import preprocessors
    from modules.engine.control.units import prepare_inputs
    from modules.models.controlnet import ControlNetFamilyMismatch, check_compatible
    from modules.models.controlnet_registry import UnknownControlNetError
    from modules.models.weights_io import CheckpointLoadError

    model = ctx.model

    def load(name: str, low_vram: bool):
        # low VRAM: the model lives on the CPU and visits the GPU only while it runs (engine.control.units)
        device = "cpu" if low_vram else model.policy.device
        file, controlnet, spec = registry.load(name, device, model.pipe.unet.dtype, model.pipe.unet)
        check_compatible(spec, file.title, model.spec.family_info, model.title)
        return file.title, controlnet

    fallback = p.init_images[0].convert("RGB") if getattr(p, "init_images", None) else None
    sources = [u.image.convert("RGB") if u.image is not None else fallback for u in units]
    # A unit on the img2img picture takes the img2img mask too (the inpaint preprocessors read it).
    masks = [getattr(p, "mask", None) if u.image is None else None for u in units]
    crop = _masked_area_crop(p, fallback)
    if crop is not None:   # inpaint "Only masked" renders a crop of the init image: so do its maps
        sources = [s.crop(crop) if s is not None and s.size == fallback.size else s for s in sources]
        masks = [m.crop(crop) if m is not None and m.size == fallback.size else m for m in masks]
    try:
        return prepare_inputs(units, sources, p.width, p.height, load, masks, seed=seed)
    except (ControlNetFamilyMismatch, UnknownControlNetError, CheckpointLoadError, ValueError,
            preprocessors.UnknownPreprocessorError, preprocessors.PreprocessorUnavailableError) as err:
        raise ProcessingError(str(err)) from None


def _masked_area_crop(p: Any, init: Any) -> tuple[int, int, int, int] | None:
    """Inpaint "Only masked": the region of the init image that is rendered (A1111's crop), else None.
    Maps of the init image's size are cropped the same way, so the control lines up (as the extension does)."""
    if init is None or getattr(p, "mask", None) is None or not getattr(p, "inpaint_full_res", False):
        return None
    from modules.core import masking

    plan = masking.plan_inpaint(init, p.mask, width=p.width, height=p.height, resize_mode=p.resize_mode,
                                mask_blur=p.mask_blur, invert=p.inpainting_mask_invert,
                                inpainting_fill=p.inpainting_fill, full_res=True, padding=p.inpaint_full_res_padding)
    return tuple(plan.crop) if plan.crop is not None else None


def _harmonious_when_a1111_inpaints(unit: Any) -> Any:
    """img2img inpainting already keeps the unmasked area: as sd-webui-controlnet does, an inpaint_only
    unit then runs as inpaint_global_harmonious (same map, no in-loop blend). The infotext keeps the unit."""
    if unit.module != "inpaint_only" or not unit.active:
        return unit
    log.warning("ControlNet: A1111 inpaint and ControlNet inpaint_only together: inpaint_only runs as "
                "inpaint_global_harmonious")
    return replace(unit, module="inpaint")



def output_maps(options: Any, control: list[Any] | None, processed: Any, size: tuple[int, int],
                hires_size: tuple[int, int] | None = None) -> list[Any]:
    """The detected maps sd-webui-controlnet appends to a job's images (gallery and API), once per job:
    each unit's map fitted to the image `size` (with hires fix: the `hires_size` map, then the first
    pass's), an inpaint map with its masked area half transparent. They carry no infotext (so
    ``images[len(infotexts):]`` are the maps) and are not saved. None with the setting
    ``control_net_no_detectmap``, and none inside SD upscale's tile runs, as in the extension."""
    if not control or options.get("control_net_no_detectmap", False):
        return []
    if "sd upscale" in ", ".join(getattr(processed, "extra_generation_params", None) or {}).lower():
        return []
    from modules.engine.control.units import fit_map

    sizes = [hires_size, size] if hires_size else [size]
    return [_visible(fit_map(unit.detected_map, w, h, unit.resize_mode)) for unit in control for w, h in sizes]


def _visible(image: Any) -> Any:
    """An inpaint map (mask in alpha): the masked area shown half transparent, as the extension shows it."""
    if image.mode != "RGBA":
        return image
    shown = image.copy()
    shown.putalpha(image.getchannel("A").point(lambda a: 255 - a // 2))
    return shown
