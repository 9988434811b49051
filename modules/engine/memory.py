"""Memory around one batch: tiled VAE choice, the fp16 VAE NaN fallback, and CUDA out-of-memory recovery.

Where the components live (--medvram/--lowvram) is decided by the hooks installed at load
(``models/offload.py``); this module only reads the job's settings and cleans up after a failure.
``batch_scope`` wraps a batch; ``vae_decode``/``vae_encode`` are what ``diffusion.decode``/``encode`` call.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator

import torch

from modules.core.out_of_memory import GpuOutOfMemoryError
from modules.engine import vae_tiling
from modules.models.devices import torch_gc

log = logging.getLogger(__name__)

# The running batch's tiling policy; None outside a batch (then: the defaults for the model).
_TILING: contextvars.ContextVar[vae_tiling.TilingPolicy | None] = contextvars.ContextVar("vae_tiling", default=None)


def tiling_policy(model: Any, options: Any = None) -> vae_tiling.TilingPolicy:
    policy = getattr(model, "policy", None)
    short = bool(policy is not None and (policy.lowram or policy.vram == "lowvram"))
    return vae_tiling.TilingPolicy(
        mode=str(getattr(options, "vae_tiling", "Automatic") or "Automatic"),
        budget_pixels=int(getattr(options, "vae_tiling_pixels", 1024 * 1024) or 1024 * 1024),
        short_memory=short,
    )


@contextlib.contextmanager
def batch_scope(model: Any, options: Any = None) -> Iterator[None]:
    """One batch: the job's tiling settings apply inside; a CUDA out-of-memory error frees what it can
    and becomes a ``GpuOutOfMemoryError`` that tells the user which flag to try."""
    token = _TILING.set(tiling_policy(model, options))
    try:
        yield
    except torch.OutOfMemoryError as err:
        recover_from_oom(model)
        vram = getattr(getattr(model, "policy", None), "vram", "normal")
        raise GpuOutOfMemoryError(str(err), vram_mode=vram) from None
    finally:
        _TILING.reset(token)


def recover_from_oom(model: Any) -> None:
    """Offloaded components back to the CPU, Python garbage collected, the CUDA cache emptied."""
    plan = getattr(model, "offload", None)
    if plan is not None:
        with contextlib.suppress(Exception):
            plan.release()
    device = getattr(getattr(model, "policy", None), "device", None)
    torch_gc(device)
    log.warning("CUDA out of memory: cache emptied; the next job can run")


def current_tiling(vae: Any) -> vae_tiling.TilingPolicy:
    return _TILING.get() or vae_tiling.TilingPolicy()


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode (tiled when the policy says so). A half-precision VAE that returns NaN (SDXL's VAE in
    fp16 does) is converted to fp32 for good and the batch decoded again, as A1111 does."""
    pixels = vae_tiling.decode(vae, latents, current_tiling(vae))
    if vae.dtype in (torch.float16, torch.bfloat16) and torch.isnan(pixels).any():
        log.warning("The VAE produced NaNs in %s; converting it to float32 (use --no-half-vae to start that way)",
                    vae.dtype)
        vae.to(torch.float32)
        pixels = vae_tiling.decode(vae, latents.float(), current_tiling(vae))
    return pixels


def vae_encode(vae: Any, pixels: torch.Tensor) -> Any:
    return vae_tiling.encode(vae, pixels, current_tiling(vae))
