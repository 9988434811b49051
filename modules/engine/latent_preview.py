"""Cheap live previews: latents → RGB by a per-channel linear map, no VAE.

This is A1111's "Approx cheap" preview. The factors are the widely published least-squares
fits of VAE-decoded colour against the 4 latent channels (SD1/SD2 share a VAE latent space;
SDXL has its own, with a bias). The result is at latent resolution (1/8 of the image side);
pass ``scale=8`` for an image-sized nearest-neighbour upscale, though browsers scale the small
image just as well and it is 64× less data to send.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = ["approx_rgb", "family_of"]

# rows: latent channels 0..3, columns: R, G, B
_SD_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_SD_BIAS = (0.0, 0.0, 0.0)

_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

Family = Literal["sd", "sdxl"]


def family_of(kind: str) -> Family:
    """Map a model kind name (``sd1``, ``sd2-v``, ``sdxl``, ``sdxl-refiner``, ...) to its latent space."""
    k = kind.lower().replace("_", "").replace("-", "").replace(" ", "")
    if k.startswith("sdxl") or k.startswith("xl"):
        return "sdxl"
    if k.startswith("sd") or k in ("v1", "v2"):
        return "sd"
    raise ValueError(f"no cheap latent preview for model family {kind!r}")


def approx_rgb(latents: torch.Tensor, family_kind: str = "sd", *, scale: int = 1) -> list[Image.Image]:
    """RGB previews of ``latents`` ([B,4,h,w] or [4,h,w], as the sampler holds them: already
    multiplied by the VAE scaling factor), one ``h×w`` image per batch item (``scale`` times
    larger with nearest-neighbour upscaling when ``scale`` > 1)."""
    family = family_of(family_kind)
    x = latents.detach()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 4:
        raise ValueError(f"expected latents shaped [B,4,h,w] or [4,h,w], got {tuple(latents.shape)}")
    factors, bias = (_SDXL_FACTORS, _SDXL_BIAS) if family == "sdxl" else (_SD_FACTORS, _SD_BIAS)
    # float32 on the CPU: fp16/bf16 on an accelerator would need the same copy for numpy anyway.
    x = x.to(device="cpu", dtype=torch.float32)
    w = torch.tensor(factors, dtype=torch.float32)
    b = torch.tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = torch.einsum("bchw,cr->brhw", x, w) + b
    # The fits map to roughly [-1, 1], like the VAE's output.
    rgb = ((rgb + 1.0) * 0.5).clamp(0.0, 1.0).nan_to_num(0.0)
    arr = (rgb.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    images = [Image.fromarray(a, "RGB") for a in arr]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    return images
