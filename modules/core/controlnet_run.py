"""A job's ControlNet units -> the engine's inputs: models loaded (and checked against the
checkpoint's family), maps preprocessed, once per job."""
from __future__ import annotations

from typing import Any


def control_inputs(p: Any, ctx: Any) -> list[Any] | None:
    """The engine's ControlInputs for `p.controlnet_units`, or None when no unit takes part.
    Raises ControlNetUnitError with a message for the user."""
    from modules.core.controlnet_units import ControlNetUnitError as ProcessingError

    units = [u.normalized(i) for i, u in enumerate(getattr(p, "controlnet_units", None) or [])]
    if not any(u.active and u.weight > 0 and u.guidance_start < u.guidance_end for u in units):
        return None
    registry = getattr(ctx, "controlnets", None)
    if registry is None:
        raise ProcessingError("ControlNet units were given, but this server has no ControlNet model folder")
    from modules.engine.control import preprocessors
    from modules.engine.control.units import prepare_inputs
    from modules.models.controlnet import ControlNetFamilyMismatch, check_compatible
    from modules.models.controlnet_registry import UnknownControlNetError
    from modules.models.weights_io import CheckpointLoadError

    model = ctx.model

    def load(name: str):
        file, controlnet, spec = registry.load(name, model.policy.device, model.pipe.unet.dtype)
        check_compatible(spec, file.title, model.spec.family_info, model.title)
        return file.title, controlnet

    fallback = p.init_images[0].convert("RGB") if getattr(p, "init_images", None) else None
    sources = [u.image.convert("RGB") if u.image is not None else fallback for u in units]
    try:
        return prepare_inputs(units, sources, p.width, p.height, load)
    except (ControlNetFamilyMismatch, UnknownControlNetError, CheckpointLoadError, ValueError,
            preprocessors.UnknownPreprocessorError, preprocessors.PreprocessorUnavailableError) as err:
        raise ProcessingError(str(err)) from None
