"""sd-webui-controlnet's ``external_code`` module, for extensions that drive ControlNet from Python.

Extensions import it the ways they import the extension's own::

    importlib.import_module("extensions.sd-webui-controlnet.scripts.external_code")
    importlib.import_module("extensions-builtin.sd-webui-controlnet.scripts.external_code")
    from lib_controlnet import external_code          # Forge

``install_aliases`` (called by webui.py before extension scripts load) makes those names resolve
to this module. Units live on the typed params (``p.params.controlnet_units``), so
``update_cn_script_in_processing(p, units)`` sets them there instead of in ``p.script_args``.
"""
from __future__ import annotations

import sys
import types
from enum import Enum
from typing import Any

from modules.core.controlnet_units import ControlNetUnit as _TypedUnit
from modules.extensions import context

ALIASES = ("extensions.sd-webui-controlnet.scripts.external_code",
           "extensions-builtin.sd-webui-controlnet.scripts.external_code",
           "lib_controlnet.external_code")


class ResizeMode(Enum):
    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"

    def int_value(self) -> int:
        return list(ResizeMode).index(self)


class ControlMode(Enum):
    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"


def _to_pil(value: Any) -> Any:
    """PIL images pass; numpy arrays (H, W[, C]) become images; base64 strings are decoded."""
    if value is None or hasattr(value, "convert"):
        return value
    if isinstance(value, str):   # base64, optionally a data: URI; bounded like API images
        import base64
        import io

        from PIL import Image

        from modules.core.limits import Limits

        image = Image.open(io.BytesIO(base64.b64decode(value.partition(",")[2] if value.startswith("data:") else value)))
        if image.width * image.height > Limits().max_input_pixels:
            raise ValueError(f"ControlNetUnit image: {image.width}x{image.height} is too large")
        image.load()
        return image
    import numpy as np
    from PIL import Image

    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


class ControlNetUnit(_TypedUnit):
    """The extension's unit class: its keyword names, Enums or labels or indices for the modes,
    images as PIL, numpy or base64 (or ``{"image": ..., "mask": ...}``). Unknown extension fields
    (input_mode, batch_images, ...) are kept as attributes and ignored."""

    def __init__(self, enabled: bool = True, module: str = "none", model: str = "None", weight: float = 1.0,
                 image: Any = None, resize_mode: Any = ResizeMode.INNER_FIT, low_vram: bool = False,
                 processor_res: int = -1, threshold_a: float = -1, threshold_b: float = -1,
                 guidance_start: float = 0.0, guidance_end: float = 1.0, pixel_perfect: bool = False,
                 control_mode: Any = ControlMode.BALANCED, mask: Any = None, **extra: Any):
        if isinstance(image, dict):
            image, mask = image.get("image"), image.get("mask", mask)
        for alias, name in (("lowvram", "low_vram"), ("input_image", "image"), ("guidance", "guidance_end")):
            if alias in extra:
                value = extra.pop(alias)
                if name == "low_vram":
                    low_vram = value
                elif name == "image":
                    image = image if image is not None else value
                else:
                    guidance_end = value
        super().__init__(enabled=enabled, module=module, model=model, weight=weight, image=_to_pil(image),
                         mask=_to_pil(mask), resize_mode=getattr(resize_mode, "value", resize_mode),
                         low_vram=low_vram, processor_res=processor_res, threshold_a=threshold_a,
                         threshold_b=threshold_b, guidance_start=guidance_start, guidance_end=guidance_end,
                         pixel_perfect=pixel_perfect, control_mode=getattr(control_mode, "value", control_mode))
        for key, value in extra.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, values: dict) -> "ControlNetUnit":
        return cls(**values)


def to_processing_unit(unit: Any) -> ControlNetUnit:
    if isinstance(unit, dict):
        return ControlNetUnit.from_dict(unit)
    if isinstance(unit, _TypedUnit):
        return unit
    raise TypeError(f"expected a ControlNetUnit or a dict, got {type(unit).__name__}")


def _params(p: Any) -> Any:
    return getattr(p, "params", p)


def get_all_units_in_processing(p: Any) -> list[Any]:
    """The units of `p` (a copy of the list; the units themselves are the job's)."""
    return list(getattr(_params(p), "controlnet_units", None) or [])


def get_enabled_units_in_processing(p: Any) -> list[Any]:
    return [u for u in get_all_units_in_processing(p) if u.enabled]


def update_cn_script_in_processing(p: Any, cn_units: list[Any], **_kwargs: Any) -> None:
    """Replace the units of `p` with `cn_units` (dicts or units)."""
    _params(p).controlnet_units = [to_processing_unit(u) for u in cn_units]


def update_cn_script(script_runner: Any, script_args: list[Any], cn_units: list[Any], **_kwargs: Any) -> None:
    """A1111 keeps units in script_args; here they live on the params: use update_cn_script_in_processing."""
    raise NotImplementedError("ControlNet is built in: use update_cn_script_in_processing(p, units)")


def find_cn_script(script_runner: Any) -> Any:
    """There is no ControlNet script object: ControlNet is built in (None, as for a runner without it)."""
    return None


def _registry() -> Any:
    services = context.services()
    return None if services is None else getattr(services, "controlnets", None)


def get_models(update: bool = False) -> list[str]:
    registry = _registry()
    if registry is None:
        return []
    if update:
        registry.refresh()
    return registry.titles()


def get_modules(alias_names: bool = False) -> list[str]:
    from modules.engine.control.preprocessors import preprocessor_names

    return preprocessor_names(alias_names)


def get_modules_detail(alias_names: bool = False) -> dict[str, Any]:
    from modules.engine.control.preprocessors import PREPROCESSORS

    return {((p.label or p.name) if alias_names else p.name): dict(p.detail) for p in PREPROCESSORS.values()}


def get_max_models_num() -> int:
    services = context.services()
    return int(services.options.get("control_net_unit_count") or 3) if services is not None else 3


def get_api_version() -> int:
    return 2


def install_aliases() -> None:
    """Make the extension's import paths name this module. A parent that does not import (there is
    no ``extensions/sd-webui-controlnet``) becomes an empty package module."""
    import importlib

    me = sys.modules[__name__]
    for alias in ALIASES:
        parts = alias.split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except ImportError:
                module = types.ModuleType(name)
                module.__path__ = []   # a package: its submodules are found in sys.modules
                sys.modules[name] = module
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], module)
        sys.modules[alias] = me
        setattr(sys.modules[".".join(parts[:-1])], parts[-1], me)
