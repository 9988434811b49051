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


_LAZY_LAYERS = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)


def apply_lazy_upcast(model: torch.nn.Module, compute: torch.dtype) -> torch.nn.Module:
    """fp32 on the CPU from a half-precision file, without converting everything at load: each
    Conv/Linear/Embedding is converted for good on its first call (a one-time hook), the rest now.

    The model is ready as soon as it is built; the conversion is paid by the first image, layer by
    layer, never holding a second copy of the whole model. The first floating parameter is converted
    now, so ``model.dtype`` (diffusers and transformers read the first parameter) says ``compute``.
    """
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    for module in model.modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if t.is_floating_point() and t.dtype != compute]
        if not own:
            continue
        if isinstance(module, _LAZY_LAYERS) and not any(t is first for t in own):
            _upcast_on_first_call(module, compute)
        else:
            _cast_own(module, compute)
    return model


def _cast_own(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _upcast_on_first_call(module: torch.nn.Module, dtype: torch.dtype) -> None:
    handle = None

    def hook(mod, _args):
        _cast_own(mod, dtype)
        handle.remove()
    handle = module.register_forward_pre_hook(hook)
