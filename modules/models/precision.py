"""Low-RAM CPU mode: weights stay in the file's fp16/bf16, each layer is upcast only while it runs.

An SD1.5 file holds fp16 weights (2.1 GB); converting them to fp32 for the CPU doubles that. Here the
Conv/Linear/Embedding layers keep their storage dtype and diffusers' layerwise casting hooks
(``diffusers.hooks.apply_layerwise_casting``) cast one layer to fp32 for its forward and back after.
What those hooks do not cover (norms, stray parameters; a few MB) is converted to fp32 once, since
mixing an fp16 GroupNorm weight with fp32 activations fails on the CPU.

Every ``module.weight`` stays a real parameter in the storage dtype, readable and writable between
forwards, so LoRA weights merged in place land in it (at fp16 precision, as on an fp16 GPU).
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["storage_dtype_of", "apply_lowram_casting", "is_lowram"]

_HALF = (torch.float16, torch.bfloat16)


def storage_dtype_of(weights: dict[str, Any]) -> torch.dtype | None:
    """The half dtype most of these weights are stored in, or None (fp32 files gain nothing)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts:
        return None
    dtype = max(counts, key=counts.__getitem__)
    return dtype if dtype in _HALF else None


def apply_lowram_casting(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> torch.nn.Module:
    """Hooks on every Conv/Linear/Embedding (kept in ``storage``); everything else to ``compute``."""
    from diffusers.hooks import apply_layerwise_casting

    torch.nn.Module.to(model, dtype=storage)  # plain Module.to: diffusers' override warns on casts
    # an empty pattern (not None): hook every supported leaf layer, skip none
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern=())
    for module in model.modules():
        if _has_casting_hook(module):
            continue
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.dtype != compute:
                tensor.data = tensor.data.to(compute)
    model._lowram_storage_dtype = storage  # noqa: SLF001 - read by is_lowram
    return model


def is_lowram(model: Any) -> bool:
    return getattr(model, "_lowram_storage_dtype", None) is not None


def _has_casting_hook(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None
