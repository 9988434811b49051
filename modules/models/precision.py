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

from typing import Any, Callable

import torch

from modules.models import materialise

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
    from diffusers.hooks import HookRegistry

    _return_freed_memory_to_the_os()
    torch.nn.Module.to(model, dtype=storage)  # plain Module.to: diffusers' override warns on casts
    for module in model.modules():
        if isinstance(module, _LAZY_LAYERS):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_StorageCastingHook(storage, compute), "layerwise_casting")
        else:
            _cast_own(module, compute)
    model._lowram_storage_dtype = storage  # noqa: SLF001 - read by is_lowram
    return model


def _storage_casting_hook_type():
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class StorageCastingHook(LayerwiseCastingHook):
        """diffusers' layerwise casting hook (under its registry name, so ``ModelMixin.dtype`` reports
        the compute dtype), but after the call the layer points back at its stored half-precision
        tensors instead of casting the fp32 copy down again: one cast per call instead of two."""

        def pre_forward(self, module, *args, **kwargs):
            materialise.ensure(module)  # still memory-mapped: copy it into memory first (materialise.py)
            self.stored = [(t, t.data) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                           if t.is_floating_point()]
            for tensor, data in self.stored:
                tensor.data = data.to(self.compute_dtype)
            return args, kwargs

        def post_forward(self, module, output):
            for tensor, data in getattr(self, "stored", ()):
                tensor.data = data
            self.stored = []
            return output
    return StorageCastingHook


def _StorageCastingHook(storage: torch.dtype, compute: torch.dtype):  # noqa: N802 - a class factory
    global _HOOK_TYPE
    if _HOOK_TYPE is None:
        _HOOK_TYPE = _storage_casting_hook_type()
    return _HOOK_TYPE(storage, compute, non_blocking=False)


_HOOK_TYPE = None


def _return_freed_memory_to_the_os() -> None:
    """Per-call fp32 copies of layers (1-25 MB each) would otherwise be recycled inside glibc's heap,
    whose dynamic mmap threshold grows to 32 MB, and RSS would keep the high-water mark: allocations
    from 1 MB up are mapped and unmapped instead (glibc only; elsewhere nothing to do)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def is_lowram(model: Any) -> bool:
    return getattr(model, "_lowram_storage_dtype", None) is not None


def _has_casting_hook(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


_LAZY_LAYERS = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)


def apply_lazy_upcast(model: torch.nn.Module, compute: torch.dtype,
                      file_backed: Callable[[torch.Tensor], bool] = lambda _t: False) -> torch.nn.Module:
    """fp32 on the CPU from a half-precision file, without converting everything at load: each
    Conv/Linear/Embedding is converted for good on its first call (a one-time hook), the rest now.

    The model is ready as soon as it is built; the conversion is paid by the first image, layer by
    layer, never holding a second copy of the whole model. The first floating parameter is converted
    now, so ``model.dtype`` (diffusers and transformers read the first parameter) says ``compute``.
    ``file_backed``: tensors still memory-mapped, which get the hook too (copied off the file on first use).
    """
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    for module in model.modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
               if (t.is_floating_point() and t.dtype != compute) or file_backed(t)]
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
        materialise.ensure(mod)  # under the background copy's lock (materialise.py)
        _cast_own(mod, dtype)
        mod.__dict__.pop(_UPCAST_HOOKED, None)
        handle.remove()
    handle = module.register_forward_pre_hook(hook)
    object.__setattr__(module, _UPCAST_HOOKED, True)


_UPCAST_HOOKED = "_webui_upcast_hooked"


def has_first_call_hook(module: torch.nn.Module) -> bool:
    """The module converts (or copies off the file) its own tensors on its next forward."""
    return _UPCAST_HOOKED in module.__dict__ or _has_casting_hook(module)
