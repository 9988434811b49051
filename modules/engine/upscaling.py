"""Upscaler names and the one plain PIL resize that hires fix, SD upscale and the API share.

Torch-free, so the names can fill dropdowns and validate requests at startup.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

LATENT_UPSCALE_MODES: dict[str, dict[str, Any]] = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")


def resize_image(image: Image.Image, size: tuple[int, int], upscaler: str = "Lanczos") -> Image.Image:
    """`image` at `size` with the named PIL upscaler: Nearest keeps hard pixels, everything else is Lanczos."""
    resample = Image.Resampling.NEAREST if upscaler == "Nearest" else Image.Resampling.LANCZOS
    return image.resize(size, resample)


# --------------------------------------------------------------------------- model upscalers (spandrel)
# build_services binds the upscaler registry of the running app once (models/upscaler_models.py), as
# webui.py binds the facade: hires fix, SD upscale and X/Y/Z read the names from here.
_registry: Any = None


def bind_model_upscalers(registry: Any) -> None:
    global _registry
    _registry = registry


def model_upscalers() -> Any:
    """The bound UpscalerRegistry, or None (no app built: tests of the engine alone)."""
    return _registry


def image_upscaler_names() -> list[str]:
    """Every image-space upscaler name: the built-ins, then the model files (A1111's order)."""
    return [*IMAGE_UPSCALERS, *(_registry.names() if _registry is not None else [])]


def is_image_upscaler(name: str) -> bool:
    return name in IMAGE_UPSCALERS or (_registry is not None and _registry.find(name) is not None)


def tile_settings(options: Any, architecture: str = "") -> Any:
    """A1111's per-family tile settings (ESRGAN_tile, SWIN_tile, SCUNET_tile and their overlaps)."""
    from modules.engine.model_upscale import TileSettings

    prefix = {"SwinIR": "SWIN", "Swin2SR": "SWIN", "HAT": "SWIN", "DAT": "SWIN", "SCUNet": "SCUNET"}.get(
        architecture, "ESRGAN")

    def get(key: str, default: int) -> int:
        value = options.get(key, default) if options is not None and hasattr(options, "get") else default
        return int(value if value is not None else default)
    return TileSettings(tile=get(f"{prefix}_tile", 192), overlap=get(f"{prefix}_tile_overlap", 8))


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler: str, *, options: Any = None,
                  on_tile: Any = None, should_stop: Any = None, registry: Any = None) -> Image.Image:
    """`image` at exactly `size` with the named upscaler: a built-in PIL resize, or a model (tiled).
    Raises KeyError-like UnknownUpscalerError for a name nobody knows, UpscalerLoadError for a bad file,
    UpscaleInterrupted when `should_stop` says so between tiles."""
    if upscaler in IMAGE_UPSCALERS:
        return resize_image(image.convert("RGB"), size, upscaler)  # "None" too: A1111 then resizes plainly
    registry = registry if registry is not None else _registry
    if registry is None:
        from modules.models.upscaler_models import UnknownUpscalerError
        raise UnknownUpscalerError(f"upscaler {upscaler!r} not found; available: {', '.join(IMAGE_UPSCALERS)}")
    from modules.engine.model_upscale import upscale_with_model

    model = registry.load(upscaler)
    return upscale_with_model(model, image.convert("RGB"), size, tile_settings(options, str(model.architecture.id)),
                              on_tile=on_tile, should_stop=should_stop)


@dataclass(frozen=True)
class UpscalerEntry:
    """A1111's `UpscalerData` as extensions read it from `shared.sd_upscalers`."""
    name: str
    data_path: str | None = None
    scale: int = 4


def upscaler_entries() -> list[UpscalerEntry]:
    from modules.models.upscaler_models import guess_scale

    files = _registry.files() if _registry is not None else []
    return [UpscalerEntry(n) for n in IMAGE_UPSCALERS] + [
        UpscalerEntry(f.name, str(f.path), guess_scale(f.name)) for f in files]
