"""Cheap live previews: latents → RGB by a per-channel linear map, no VAE.

This is A1111's "Approx cheap" preview. The factors are the widely published least-squares
fits of VAE-decoded colour against the latent channels; each family record's ``LatentFormat``
holds them (SD1/SD2 share a VAE latent space; SDXL has its own, with a bias). The result is at
latent resolution (1/8 of the image side); pass ``scale=8`` for an image-sized nearest-neighbour
upscale, though browsers scale the small image just as well and it is 64× less data to send.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules.models.families import LATENT_FORMATS, SD_LATENT, LatentFormat, get_family

__all__ = ["approx_rgb", "latent_format_of"]


def latent_format_of(kind: str) -> LatentFormat:
    """A latent format by its name (``sd``, ``sdxl``) or by a family id (``sd2-v``, ``sdxl-refiner``...)."""
    k = kind.lower()
    if k in LATENT_FORMATS:
        return LATENT_FORMATS[k]
    try:
        return get_family(k).latent
    except KeyError:
        raise ValueError(f"no cheap latent preview for model family {kind!r}") from None


def approx_rgb(latents: torch.Tensor, latent: LatentFormat | str = SD_LATENT, *, scale: int = 1) -> list[Image.Image]:
    """RGB previews of ``latents`` ([B,C,h,w] or [C,h,w], as the sampler holds them: already
    multiplied by the VAE scaling factor), one ``h×w`` image per batch item (``scale`` times
    larger with nearest-neighbour upscaling when ``scale`` > 1). ``latent``: the model's
    ``LatentFormat`` (its family record's), or a name ``latent_format_of`` knows."""
    fmt = latent if isinstance(latent, LatentFormat) else latent_format_of(latent)
    x = latents.detach()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != fmt.channels:
        raise ValueError(f"expected latents shaped [B,{fmt.channels},h,w] or [{fmt.channels},h,w], "
                         f"got {tuple(latents.shape)}")
    # float32 on the CPU: fp16/bf16 on an accelerator would need the same copy for numpy anyway.
    x = x.to(device="cpu", dtype=torch.float32)
    w = torch.tensor(fmt.rgb_factors, dtype=torch.float32)
    b = torch.tensor(fmt.rgb_bias, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = torch.einsum("bchw,cr->brhw", x, w) + b
    # The fits map to roughly [-1, 1], like the VAE's output.
    rgb = ((rgb + 1.0) * 0.5).clamp(0.0, 1.0).nan_to_num(0.0)
    arr = (rgb.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    images = [Image.fromarray(a, "RGB") for a in arr]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    return images
