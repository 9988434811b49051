"""ControlNet units: the typed parameters of one control, in sd-webui-controlnet's vocabulary.

The API's ``alwayson_scripts.controlnet.args`` entries, the UI's unit tabs, the infotext's
``ControlNet N: "Module: …, Model: …"`` entries and extensions' ``external_code.ControlNetUnit``
all become a ``ControlNetUnit``; the pipeline reads only that. Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
MAX_UNITS = 10   # the most units one request may carry (control_net_unit_count is capped at it)
# Preprocessors that need no ControlNet model (the extension's model-free attention injection, engine.control.reference).
REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")

# The extension's older resize-mode names, still sent by clients.
_RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill",
}
# Deprecated field names the extension still accepts (alias -> field).
FIELD_ALIASES = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "mask_image": "mask"}
# What the extension writes to the infotext, in its order.
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")


class ControlNetUnitError(ValueError):
    """A unit field that cannot be used; the message names the unit and the field."""


@dataclass
class ControlNetUnit:
    enabled: bool = True
    module: str = "none"                 # preprocessor name (engine.control.preprocessors)
    model: str = "None"                  # "name" or "name [hash]"; "None": no model (unit is off)
    weight: float = 1.0
    image: Any = None                    # PIL image; None: the img2img input image
    mask: Any = None                     # PIL image (L); white = the area the preprocessor treats as masked
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1              # -1: the preprocessor's default (512)
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0          # fractions of the sampling steps
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"

    @property
    def active(self) -> bool:
        """Enabled with a model, or a model-free module: it takes part in the run (weight 0 still runs
        nothing, see engine)."""
        if self.module in REFERENCE_MODULES:
            return bool(self.enabled)
        return bool(self.enabled) and bool(self.model) and self.model != "None"

    def normalized(self, index: int = 0) -> "ControlNetUnit":
        """A copy with enum fields given by number or old name turned into their labels; raises
        ControlNetUnitError naming `index` and the field."""
        try:
            return replace(self, resize_mode=_label(self.resize_mode, RESIZE_MODES, _RESIZE_ALIASES),
                           control_mode=_label(self.control_mode, CONTROL_MODES, {}),
                           hr_option=_label(self.hr_option, HR_OPTIONS, {}),
                           weight=float(self.weight), guidance_start=float(self.guidance_start),
                           guidance_end=float(self.guidance_end), processor_res=int(float(self.processor_res)),
                           threshold_a=float(self.threshold_a), threshold_b=float(self.threshold_b),
                           enabled=_bool(self.enabled), low_vram=_bool(self.low_vram),
                           pixel_perfect=_bool(self.pixel_perfect), module=str(self.module or "none"),
                           model=str(self.model or "None"))
        except (TypeError, ValueError) as exc:
            raise ControlNetUnitError(f"ControlNet unit {index}: {exc}") from None

    def validate(self, index: int = 0, max_side: int = 8192) -> None:
        for name in ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b"):
            if not math.isfinite(float(getattr(self, name))):
                raise ControlNetUnitError(f"ControlNet unit {index}: {name} must be a finite number")
        if not 0 <= self.weight <= 2:
            raise ControlNetUnitError(f"ControlNet unit {index}: weight must be between 0 and 2, got {self.weight}")
        if not 0 <= self.guidance_start <= self.guidance_end <= 1:
            raise ControlNetUnitError(f"ControlNet unit {index}: need 0 <= guidance_start ({self.guidance_start}) "
                                      f"<= guidance_end ({self.guidance_end}) <= 1")
        if self.processor_res > max_side:
            raise ControlNetUnitError(f"ControlNet unit {index}: processor_res {self.processor_res} is more than "
                                      f"{max_side}")

    def infotext(self) -> str:
        """The extension's entry: ``Module: canny, Model: x [hash], Weight: 1.0, …`` (no quoting)."""
        parts = []
        for name in INFOTEXT_FIELDS:
            value = getattr(self, name)
            label = " ".join(w.capitalize() for w in name.split("_"))
            parts.append(f"{label}: {value}")
        return ", ".join(parts)

    @classmethod
    def from_infotext(cls, text: str) -> "ControlNetUnit":
        """The other direction; an entry that does not parse raises ControlNetUnitError."""
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for item in str(text).split(","):
            key, sep, raw = item.strip().partition(": ")
            field_name = "_".join(w.lower() for w in key.split(" "))
            if not sep or field_name not in names:
                raise ControlNetUnitError(f"not a ControlNet infotext entry: {text!r}")
            values[field_name] = _parse_value(raw.strip())
        return cls(enabled=True, **values).normalized()

    @classmethod
    def from_request(cls, data: Any, decode_image: Callable[[Any, str], Any], index: int = 0) -> "ControlNetUnit":
        """An ``alwayson_scripts.controlnet.args`` entry (the extension's names, aliases and defaults).
        `decode_image(value, field)` turns a base64 string into a PIL image."""
        if isinstance(data, ControlNetUnit):
            return data.normalized(index)
        if not isinstance(data, dict):
            raise ControlNetUnitError(f"ControlNet unit {index}: expected an object, got {type(data).__name__}")
        values = dict(data)
        for alias, name in FIELD_ALIASES.items():
            if alias in values:
                if name in values and values[name] is not None and values[alias] is not None:
                    raise ControlNetUnitError(f"ControlNet unit {index}: give '{name}' or '{alias}', not both")
                alias_value = values.pop(alias)
                if values.get(name) is None:
                    values[name] = alias_value
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and v is not None}
        image = kwargs.pop("image", None)
        mask = kwargs.pop("mask", None)
        if isinstance(image, dict):          # {"image": b64, "mask": b64}
            image, mask = image.get("image"), image.get("mask", mask)
        elif isinstance(image, (list, tuple)) and len(image) == 2 and not isinstance(image[0], dict):
            image, mask = image
        unit = cls(**kwargs).normalized(index)
        unit.image = decode_image(image, f"controlnet unit {index} image") if isinstance(image, str) and image else None
        unit.mask = decode_image(mask, f"controlnet unit {index} mask") if isinstance(mask, str) and mask else None
        return unit


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def _label(value: Any, labels: tuple[str, ...], aliases: dict[str, str]) -> str:
    """An enum field given as its label, an old alias, its index (int or "1"), or an Enum with a .value."""
    value = getattr(value, "value", value)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not one of {labels}")
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if 0 <= index < len(labels):
            return labels[index]
        raise ValueError(f"{value!r} is not one of 0-{len(labels) - 1} ({', '.join(labels)})")
    text = aliases.get(str(value), str(value))
    for label in labels:
        if label.lower() == text.lower():
            return label
    raise ValueError(f"{value!r} is not one of {', '.join(labels)}")


def _parse_value(raw: str) -> Any:
    if raw in ("True", "False"):
        return raw == "True"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def units_from_request(args: Any, decode_image: Callable[[Any, str], Any]) -> list[ControlNetUnit]:
    """The ``alwayson_scripts["controlnet"]`` value (``{"args": [...]}`` or a bare list) -> units."""
    if isinstance(args, dict):
        args = args.get("args") or []
    if not isinstance(args, list):
        raise ControlNetUnitError('alwayson_scripts["controlnet"] must be {"args": [unit, ...]}')
    if len(args) > MAX_UNITS:
        raise ControlNetUnitError(f"at most {MAX_UNITS} ControlNet units, got {len(args)}")
    return [ControlNetUnit.from_request(a, decode_image, i) for i, a in enumerate(args)]


def infotext_entries(units: list[ControlNetUnit]) -> dict[str, str]:
    """``{"ControlNet 0": "Module: …", …}`` for the active units, keyed by their position (as the extension)."""
    return {f"ControlNet {i}": u.infotext() for i, u in enumerate(units) if u.active}


def units_from_infotext(parsed: dict[str, Any]) -> dict[int, ControlNetUnit]:
    """Pasted ``ControlNet N`` entries -> {N: unit}; entries that do not parse are skipped."""
    out: dict[int, ControlNetUnit] = {}
    for key, value in parsed.items():
        head, _, index = str(key).partition(" ")
        if head != "ControlNet" or not index.isdigit() or int(index) >= MAX_UNITS:
            continue
        try:
            out[int(index)] = ControlNetUnit.from_infotext(str(value))
        except ControlNetUnitError:
            continue
    return out
