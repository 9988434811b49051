"""depth2img inputs, torch-free: may this job run on an SD2 depth model, and the user's depth map
prepared like the init image.

An SD2 depth checkpoint (``512-depth-ema.ckpt`` + ``v2-midas-inference.yaml``) takes the depth of the
init image as a fifth UNet input channel. The depth comes from a map the user supplies (img2img's
"Depth map" input, the API's ``depth_image``: greyscale, white = near, 8- or 16-bit) or from the
local depth estimator (modules/models/depth.py). The engine turns it into that channel
(modules/engine/depth2img.py).
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from modules.core import masking
from modules.models import depth as depth_models
from modules.models import midas_embedded


def refusal(model_title: str, *, is_img2img: bool, has_depth_image: bool,
            estimators: depth_models.DepthEstimators | None = None, model: Any = None) -> str | None:
    """Why a job cannot run on a depth model (None: it can). `model`: the loaded model, whose checkpoint
    may carry its own MiDaS estimator (models/midas_embedded.py)."""
    if not is_img2img:
        return (f"{model_title} is an SD2 depth model: it redraws an init image following the image's depth map. "
                "Use img2img (txt2img has no image to take the depth from).")
    if has_depth_image:
        return None
    estimators = estimators or depth_models.default_estimators()
    if estimators.find() is not None or midas_embedded.of(model) is not None:
        return None
    embedded = getattr(model, "embedded_depth", None)
    own = (embedded.describe_problem() if embedded is not None else
           "the checkpoint has no MiDaS weights of its own (depth_model.*, as in Stability's 512-depth-ema.ckpt)")
    return (f"{model_title} is an SD2 depth model and needs a depth map of the init image. Supply one (img2img's "
            f"'Depth map' input, or `depth_image` in the API), or install a depth estimator: "
            f"{estimators.missing_message(None)}. ({own[0].upper() + own[1:]}.)")


def as_float_image(depth: Image.Image) -> Image.Image:
    """A depth map as a 32-bit float image ("F"), keeping 16-bit precision; colour maps by luminance."""
    if depth.mode == "F":
        return depth
    if depth.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return depth.convert("I").convert("F")
    return depth.convert("L").convert("F")


def prepare_depth_image(depth: Image.Image, *, width: int, height: int, resize_mode: int, plan: Any = None,
                        source_size: tuple[int, int] | None = None) -> Image.Image:
    """The supplied map, geometrically like the init image: for "Only masked" the same crop of the
    picture, else the same resize mode, to width x height ("F" mode). Latent upscale (mode 3) stretches."""
    f = as_float_image(depth)
    if plan is not None and plan.crop is not None:
        f = masking.resize_image(f, plan.original.width, plan.original.height, 0)
        return masking.resize_image(f.crop(plan.crop), width, height, 2)
    if source_size is not None and f.size != source_size and resize_mode != 0:
        f = masking.resize_image(f, source_size[0], source_size[1], 0)  # drawn over the picture: align first
    return masking.resize_image(f, width, height, 0 if resize_mode == 3 else resize_mode)
