"""In-loop post-processing of the UNet's prediction for the preprocessors that need it, with
sd-webui-controlnet's semantics (re-implemented from its behaviour):

* ``tile_colorfix`` / ``tile_colorfix+sharp``: the predicted x0 keeps its own detail but takes its low
  frequencies from the input image's latent (a box blur of radius ``Variation``, doubled in the hires
  pass). "+sharp" also moves the unconditional rows' x0 towards a blurred x0 (by ``Sharpness`` %), so
  CFG pushes away from blur.
* ``inpaint_only`` (``inpaint_only+lama``): outside the mask (dilated to the latent grid) the predicted
  x0 is the input image's latent; after decoding, the input picture is pasted back outside the mask
  (dilated and box-blurred by the setting ``control_net_inpaint_blur_sigma``, 7 by default).

Each fix replaces the prediction by ``min(weight, 1)``. As in the extension, the fixes act on every
step of a pass the unit takes part in, not only inside its guidance window. The prediction is turned
into x0 and back with the checkpoint's own noise schedule (epsilon or v-prediction); the UNet input
is in DDPM scale (``scheduler.scale_model_input`` has made it so for the k-diffusion samplers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.engine.control.annotators import COLORFIX_SHARPNESS, COLORFIX_VARIATION
from modules.engine.control.units import fit_map

DEFAULT_INPAINT_BLUR_SIGMA = 7   # sd-webui-controlnet's control_net_inpaint_blur_sigma default


def is_colorfix(module: str) -> bool:
    return "colorfix" in (module or "")


def is_inpaint_only(module: str) -> bool:
    return (module or "").startswith("inpaint_only")


def blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Box blur of radius `radius` with edge replication (the mean over a (2r+1)^2 window)."""
    if radius <= 0:
        return x
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, 2 * radius + 1, stride=1)


class NoiseSchedule:
    """x_t = a x0 + b eps with a = sqrt(alpha_bar(t)), b = sqrt(1 - alpha_bar(t)); fractional t (the
    k-diffusion samplers' interpolated timesteps) reads sigma = b / a linearly between whole steps."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"ControlNet post-processing needs an epsilon or v-prediction model, not {prediction_type}")
        ac = alphas_cumprod.double().cpu().numpy()
        self.sigmas = np.sqrt((1.0 - ac) / ac)
        self.v_prediction = prediction_type == "v_prediction"

    @classmethod
    def from_config(cls, config: Any) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        base = DDPMScheduler.from_config(config)   # the training schedule the config describes
        return cls(base.alphas_cumprod, getattr(base.config, "prediction_type", "epsilon"))

    def coefficients(self, t, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        steps = np.atleast_1d(torch.as_tensor(t).detach().cpu().double().numpy()).reshape(-1)  # MPS has no float64
        sigma = np.interp(steps, np.arange(len(self.sigmas)), self.sigmas)
        alpha_bar = 1.0 / (1.0 + sigma ** 2)
        a = torch.as_tensor(np.sqrt(alpha_bar), dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        b = torch.as_tensor(np.sqrt(1.0 - alpha_bar), dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        return a.expand(rows, -1, -1, -1), b.expand(rows, -1, -1, -1)

    def to_x0(self, x, out, a, b):
        return a * x - b * out if self.v_prediction else (x - b * out) / a

    def from_x0(self, x, x0, a, b):
        return (a * x - x0) / b if self.v_prediction else (x - a * x0) / b


@dataclass
class LatentFix:
    """One unit's change of x0: `latent` is the unit's input image in latent space, [1, C, h, w]."""
    module: str
    weight: float
    latent: torch.Tensor
    radius: int = 0                    # colour fix: the blur radius (latent pixels)
    detail: float = 0.0                # colour fix +sharp: the unconditional rows' blur share
    mask: torch.Tensor | None = None   # inpaint_only: [1, 1, h, w], 1 = repaint

    def apply(self, x0: torch.Tensor, n_cond: int) -> torch.Tensor:
        if self.mask is not None:
            return x0 * self.mask + self.latent * (1 - self.mask)
        fixed = x0 - blur(x0, self.radius) + blur(self.latent.expand_as(x0), self.radius)
        if self.detail and n_cond < fixed.shape[0]:
            softer = self.detail * blur(fixed, self.radius) + (1 - self.detail) * fixed
            fixed = torch.cat([fixed[:n_cond], softer[n_cond:]])
        return fixed


class PredictionFix:
    """The units' fixes for one pass, applied in unit order to each UNet output."""

    def __init__(self, fixes: list[LatentFix], schedule: NoiseSchedule):
        self.fixes, self.schedule = fixes, schedule

    def __call__(self, x: torch.Tensor, t, out: torch.Tensor, n_cond: int) -> torch.Tensor:
        x = x.float()
        a, b = self.schedule.coefficients(t, x.shape[0], x.device)
        result = out.float()
        for fix in self.fixes:
            x0 = fix.apply(self.schedule.to_x0(x, result, a, b), n_cond)
            w = max(0.0, min(1.0, fix.weight))
            result = self.schedule.from_x0(x, x0, a, b) * w + result * (1 - w)
        return result.to(out.dtype)


def prediction_fix(units: list[Any], width: int, height: int, *, hires: bool,
                   encode: Callable[[list[Image.Image]], torch.Tensor], scheduler_config: Any,
                   device) -> PredictionFix | None:
    """The fixes of the pass's units (engine.control.units.ControlInput), or None when none needs one.
    `encode(images)` -> their scaled latents (the model's VAE)."""
    wanted = [u for u in units if is_colorfix(u.module) or is_inpaint_only(u.module)]
    if not wanted:
        return None
    fixes = []
    for unit in wanted:
        fitted = fit_map(unit.detected_map, width, height, unit.resize_mode)
        latent = encode([fitted.convert("RGB")]).to(device=device, dtype=torch.float32)[:1]
        if is_inpaint_only(unit.module):
            if fitted.mode != "RGBA":
                continue   # no mask: nothing to keep (the extension skips a 3-channel hint too)
            fixes.append(LatentFix(unit.module, unit.weight, latent, mask=_latent_mask(fitted, latent.shape[-2:], device)))
        else:
            radius = int(COLORFIX_VARIATION.pick(unit.threshold_a)) * (2 if hires else 1)
            detail = COLORFIX_SHARPNESS.pick(unit.threshold_b) * 0.01 if "+sharp" in unit.module else 0.0
            fixes.append(LatentFix(unit.module, unit.weight, latent, radius=radius, detail=detail))
    return PredictionFix(fixes, NoiseSchedule.from_config(scheduler_config)) if fixes else None


def _latent_mask(fitted: Image.Image, size, device) -> torch.Tensor:
    """The map's mask (alpha) on the latent grid: a pixel counts as masked when any pixel of its 8x8 cell
    or its one-pixel border is (a 10x10 max pool, stride 8, as the extension dilates it)."""
    alpha = torch.from_numpy(np.asarray(fitted.getchannel("A"), dtype=np.float32) / 255.0)[None, None]
    mask = F.max_pool2d(alpha, (10, 10), stride=(8, 8), padding=1)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=tuple(size), mode="nearest")
    return mask.to(device)


def restore_pixels(units: list[Any] | None, images: list[Image.Image], blur_sigma: int | None = None) -> list[Image.Image]:
    """inpaint_only's last step: outside the mask the decoded image is the input picture again (the
    mask dilated and box-blurred by `blur_sigma` pixels, so the seam is soft). Other units: unchanged."""
    wanted = [u for u in units or [] if is_inpaint_only(u.module) and u.detected_map.mode == "RGBA"]
    if not wanted or not images:
        return images
    sigma = DEFAULT_INPAINT_BLUR_SIGMA if blur_sigma is None else max(0, int(blur_sigma))
    out = []
    for image in images:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        for unit in wanted:
            fitted = np.asarray(fit_map(unit.detected_map, image.width, image.height, unit.resize_mode),
                                dtype=np.float32) / 255.0
            keep_new = _soft_mask(fitted[..., 3], sigma)[..., None]
            pixels = keep_new * pixels.clip(0, 1) + (1 - keep_new) * fitted[..., :3]
        out.append(Image.fromarray((pixels.clip(0, 1) * 255.0).round().astype(np.uint8)))
    return out


def _soft_mask(mask: np.ndarray, sigma: int) -> np.ndarray:
    if sigma <= 0:
        return mask
    import cv2

    kernel = np.ones((sigma, sigma), dtype=np.uint8)
    return cv2.blur(cv2.dilate(mask, kernel), (sigma, sigma))
