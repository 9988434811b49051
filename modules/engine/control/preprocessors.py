"""ControlNet preprocessors ("modules" in sd-webui-controlnet's wire format), by the extension's names.

Each preprocessor turns a PIL image into a control map. ``PREPROCESSORS`` is the one registry: the
API's ``/controlnet/module_list`` (with ``module_detail``), ``/controlnet/detect``, the UI dropdown and
the units all read it. A preprocessor that needs weight files the user has not installed stays listed,
and ``get_preprocessor`` refuses it with a message naming the file and where it goes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image, ImageOps

from modules.engine.control import annotators


@dataclass(frozen=True)
class PreprocessorArgs:
    """A unit's preprocessor settings (the extension's ``processor_res``, ``threshold_a``, ``threshold_b``)."""
    resolution: int = 512
    threshold_a: float = -1
    threshold_b: float = -1
    # Random preprocessors (shuffle): the extension seeds NumPy with (seed + subseed) & 0xFFFFFFFF.
    seed: int | None = None


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[[Image.Image, PreprocessorArgs], Image.Image]
    # sd-webui-controlnet's module_detail entry: {"model_free": bool, "sliders": [...]}
    detail: dict[str, Any] = field(default_factory=lambda: {"model_free": False, "sliders": []})
    # None when usable; otherwise why not (e.g. "needs models/depth/<folder>/config.json + weights")
    unavailable: Callable[[], str | None] = lambda: None
    # the extension's display name ("alias"), e.g. "depth_midas" for "depth"; "" = the name
    label: str = ""


class UnknownPreprocessorError(LookupError):
    """The module name is not one we know; the message lists the valid names."""


class PreprocessorUnavailableError(RuntimeError):
    """The preprocessor is known but its files are missing; the message says which file goes where."""


PREPROCESSORS: dict[str, Preprocessor] = {}


def register(pre: Preprocessor) -> Preprocessor:
    PREPROCESSORS[pre.name] = pre
    return pre


def preprocessor_names(alias_names: bool = False) -> list[str]:
    """The module names (``alias_names``: the extension's labels, as ``/controlnet/module_list?alias_names=true``)."""
    return [(p.label or p.name) if alias_names else p.name for p in PREPROCESSORS.values()]


def get_preprocessor(name: str) -> Preprocessor:
    """By module name or by label, as the extension accepts both."""
    pre = PREPROCESSORS.get(name) or next((p for p in PREPROCESSORS.values() if p.label == name), None)
    if pre is None:
        raise UnknownPreprocessorError(f"unknown ControlNet preprocessor {name!r}; "
                                       f"valid: {', '.join(PREPROCESSORS)}")
    reason = pre.unavailable()
    if reason:
        raise PreprocessorUnavailableError(f"ControlNet preprocessor {name!r} is not available: {reason}")
    return pre


def _identity(image: Image.Image, args: PreprocessorArgs) -> Image.Image:
    return image.convert("RGB")


def _invert(image: Image.Image, args: PreprocessorArgs) -> Image.Image:
    return ImageOps.invert(image.convert("RGB"))


# module_detail as the extension serves it: "model_free" means "needs no ControlNet model" (reference_*),
# so it is False here; "none" shows the resolution slider, "invert" hides it.
_RESOLUTION = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
register(Preprocessor("none", _identity, {"model_free": False, "sliders": [_RESOLUTION]}))
register(Preprocessor("invert", _invert, {"model_free": False, "sliders": []},
                      label="invert (from white bg & black line)"))
for _spec in annotators.BUILTIN:  # the model-free maps, depth, and those listed but needing controlnet-aux
    register(Preprocessor(**_spec))
