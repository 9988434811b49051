"""The CUDA fast path, applied at load when no offload mode is on.

- fp16 (or fp32 with --no-half / --precision full) comes from ``DevicePolicy``; attention is
  PyTorch's SDPA, which diffusers' default attention processor already uses.
- channels_last for the convolution-heavy UNet and VAE (faster cuDNN kernels in half precision).
- --opt-compile: ``torch.compile`` the UNet and the VAE decoder in place (``Module.compile``), static
  shapes: each new image size compiles once and is then cached, up to ``COMPILE_CACHE_SIZE`` sizes.

Not measured on a GPU in this repository yet: see docs/performance.md.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_CACHE_SIZE = 32  # distinct shapes kept compiled per module (torch's default is 8)


def apply(components: dict[str, Any], policy: Any) -> None:
    for name in ("unet", "vae"):
        module = components.get(name)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)
    if policy.compile:
        compile_modules(components)


def compile_modules(components: dict[str, Any]) -> None:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
    targets = [components.get("unet"), getattr(components.get("vae"), "decoder", None)]
    for module in targets:
        if isinstance(module, torch.nn.Module):
            module.compile(dynamic=False)
    log.info("--opt-compile: the UNet and VAE decoder compile on their first run at each image size")
