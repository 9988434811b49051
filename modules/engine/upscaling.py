"""Upscaler names and the one plain PIL resize that hires fix, SD upscale and the API share.

Torch-free, so the names can fill dropdowns and validate requests at startup.
"""
from __future__ import annotations

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
