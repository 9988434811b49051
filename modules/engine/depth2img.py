"""SD2 depth models: the depth of each init image as the UNet's fifth input channel.

As diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map does: the depth (the estimator's raw
prediction, or the user's map) is resized bicubically (align_corners=False) to the latent size, then
min-max normalised per image to [-1, 1]. A flat map (max = min), which makes diffusers divide by zero,
becomes all zeros here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from modules.models import depth as depth_models
from modules.models import midas_embedded


def is_depth_model(model) -> bool:
    return model.pipe.unet.config.in_channels == 5


def depth_image_cond(model, init, width: int, height: int, device, dtype) -> torch.Tensor | None:
    """[B, 1, height/8, width/8] for a depth model, None for any other. `init` is diffusion.InitImages:
    its `depth_maps` (the user's, prepared to the job size) or else an estimator on its images."""
    if not is_depth_model(model):
        return None
    f = model.spec.family_info.latent.downscale
    size = (height // f, width // f)
    supplied = getattr(init, "depth_maps", None)
    if supplied:
        maps = [torch.from_numpy(np.asarray(supplied[i % len(supplied)], dtype=np.float32).copy())
                for i in range(len(init.images))]
    else:
        maps = [torch.from_numpy(m) for m in _estimate(model, init.images, device)]
    return torch.cat([_latent_depth(m, size) for m in maps]).to(device=device, dtype=dtype)


def _estimate(model, images, device) -> list[np.ndarray]:
    """An estimator folder (models/depth/...) when there is one, else the MiDaS inside the checkpoint."""
    estimators = depth_models.default_estimators()
    folder = estimators.find()
    embedded = midas_embedded.of(model)
    if folder is None and embedded is not None:
        park = getattr(model, "offload", None) is not None  # --medvram/--lowvram: back to the CPU after use
        return [embedded.estimate_raw(image, device, park=park) for image in images]
    folder = folder or estimators.require()
    return [estimators.estimate_raw(image, folder) for image in images]


def _latent_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    d = F.interpolate(depth.float()[None, None], size=size, mode="bicubic", align_corners=False)
    lo, hi = d.amin(), d.amax()
    if hi <= lo:
        return torch.zeros_like(d)
    return 2.0 * (d - lo) / (hi - lo) - 1.0
